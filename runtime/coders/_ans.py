"""``ans``: range-variant ANS via constriction over a stored, quantized frequency table.

``frequencies`` (uint32[K]) are the empirical counts quantized to sum to ``2 ** precision``,
every present symbol >= 1, absent symbols 0. The coder runs over the *present* sub-alphabet
(symbols with a non-zero frequency, in increasing order): constriction gives every symbol of
its alphabet a non-zero probability, so coding over all K would waste bits on absent symbols.
The remap is recomputed from the stored table, hence canonical. The payload is constriction's
compressed uint32 words, little-endian. With a single present symbol the payload is empty.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.coders._common import FORMAT_VERSION, CodedStream, int_table, symbol_dtype
from runtime.errors import CorruptBlob

try:  # constriction is a compiled extension; keep import errors readable.
    import constriction
except ImportError as exc:  # pragma: no cover - dependency is pinned in pyproject
    raise ImportError("the 'ans' coder needs constriction==0.5.0") from exc

PRECISION = 24
"""Frequency precision: constriction's own Categorical precision, so our table is representable
and the quantization loss stays below ~1e-4 bits per symbol even with 65536 present symbols."""

MAX_PRECISION = 24


def quantize(counts: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Counts -> uint32 frequencies summing to ``2 ** precision``; present symbols get >= 1.

    Each present symbol is given 1, the remaining ``2 ** precision - M`` units are shared out
    proportionally by largest remainder (ties to the lower symbol). Pure integer arithmetic, so
    the table is a deterministic function of the counts on every platform.
    """
    counts = counts.astype(np.int64)
    present = counts > 0
    m = int(present.sum())
    total = 1 << precision
    if m > total:
        raise ValueError(f"{m} present symbols do not fit precision {precision}")
    n = int(counts.sum())
    spare = total - m
    # counts <= MAX_COUNT (2**32) and spare < 2**24, so the products fit in int64 exactly.
    scaled = counts * spare
    share = scaled // max(n, 1)
    remainder = scaled % max(n, 1)
    left = spare - int(share.sum())
    if left:
        order = np.lexsort((np.arange(counts.size), -remainder))
        share[order[:left]] += 1
    freq = np.where(present, share + 1, 0)
    return freq.astype(np.uint32)


def _model(sub_freq: np.ndarray, precision: int) -> object:
    """constriction model over the present sub-alphabet; float64 probabilities are exact."""
    probs = sub_freq.astype(np.float64) / float(1 << precision)
    return constriction.stream.model.Categorical(probs, perfect=False)


def _words_to_bytes(words: np.ndarray) -> bytes:
    return words.astype("<u4", copy=False).tobytes()


def encode_ans(symbols: np.ndarray, alphabet_size: int) -> CodedStream:
    """Quantize, remap to the present sub-alphabet, then code with constriction's AnsCoder."""
    if symbols.size == 0:
        return CodedStream("ans", FORMAT_VERSION, payload=b"")
    counts = np.bincount(symbols, minlength=alphabet_size)
    freq = quantize(counts, PRECISION)
    present = np.flatnonzero(freq)
    payload = b""
    if present.size > 1:
        remap = np.cumsum(freq > 0, dtype=np.int64) - 1
        sub = remap[symbols].astype(np.int32)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sub, _model(freq[present], PRECISION))
        payload = _words_to_bytes(coder.get_compressed())
    return CodedStream("ans", FORMAT_VERSION, payload=payload, frequencies=freq,
                       precision=PRECISION)


def _check_count_fits(count: int, payload_bytes: int, top_frequency: int, precision: int) -> None:
    """Refuse, before decoding, a count the payload cannot hold: every symbol costs at least
    log2(2**precision / top_frequency) bits, and the payload holds 8 bytes of coder state more
    than its information. Twice the bound leaves room for constriction's own rounding."""
    min_bits = precision - math.log2(top_frequency)
    if count * min_bits > 2 * (8 * payload_bytes + 64):
        raise CorruptBlob(f"a {payload_bytes}-byte ans payload cannot hold {count} symbols of "
                          f"at least {min_bits:.3g} bits each")


def decode_ans(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Validate the frequency table, decode ``count`` sub-alphabet symbols, map them back."""
    dtype = symbol_dtype(alphabet_size)
    payload = stream.payload
    if count == 0:
        if payload:
            raise CorruptBlob("ans payload is not empty for an empty stream")
        return np.zeros(0, dtype=dtype)
    precision = stream.precision
    if not isinstance(precision, int | np.integer) or not 1 <= precision <= MAX_PRECISION:
        raise CorruptBlob(f"ans precision {precision!r} is outside 1..{MAX_PRECISION}")
    precision = int(precision)
    freq = int_table(stream.frequencies, "ans frequencies", alphabet_size, 1 << precision)
    if int(freq.sum()) != 1 << precision:
        raise CorruptBlob(f"ans frequencies sum to {int(freq.sum())}, not 2**{precision}")
    present = np.flatnonzero(freq)
    if present.size == 1:
        # Zero bits per symbol: only the caller's count (checked against the tensor's shape
        # and the file's total) bounds this stream.
        if payload:
            raise CorruptBlob("ans payload is not empty for a single-symbol stream")
        return np.full(count, present[0], dtype=dtype)
    if not payload or len(payload) % 4:
        raise CorruptBlob(f"ans payload of {len(payload)} bytes is not a whole number of words")
    _check_count_fits(count, len(payload), int(freq.max()), precision)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)  # native order copy
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        sub = coder.decode(_model(freq[present], precision), count)
        finished = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptBlob(f"ans payload does not decode: {exc}") from exc
    if not finished:
        raise CorruptBlob("ans payload has data left over after the declared symbol count")
    sub = np.asarray(sub)
    if sub.shape != (count,) or (count and (int(sub.min()) < 0 or int(sub.max()) >= present.size)):
        raise CorruptBlob("ans payload decoded to symbols outside the frequency table")
    return present[sub].astype(dtype)
