"""Lossless entropy coders for integer symbol streams (codebook indices, raw tensor bytes).

``encode`` turns a numpy symbol array over an alphabet of ``K`` letters (1 <= K <= 65536) into a
:class:`CodedStream`; ``decode`` inverts it from the stored fields alone. ``encode_best`` tries
several coders and keeps the smallest honest cost (payload plus parameter tables), preferring the
fast-decoding coders unless a slow one saves more than 2 %.
The byte layouts are documented in ``docs/CODERS.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from runtime.coders._ans import decode_ans, encode_ans
from runtime.coders._common import (
    CODERS,
    FORMAT_VERSION,
    CodedStream,
    CoderParams,
    check_alphabet,
    check_count,
    check_version,
    entropy_bits,
    min_bits,
    prepare_symbols,
    symbol_dtype,
)
from runtime.coders._huffman import decode_huffman, encode_huffman
from runtime.coders._packed import (
    MAX_ZSTD_EXPANSION,
    decode_raw,
    decode_zstd,
    encode_raw,
    encode_zstd,
)
from runtime.coders._runs import applies as _runs_applies, decode_runs, encode_runs
from runtime.errors import CorruptBlob

__all__ = [
    "BYTE_WIDE",
    "CODERS",
    "FAST_CODERS",
    "FORMAT_VERSION",
    "MAX_ZSTD_EXPANSION",
    "SLOW_MARGIN_PERCENT",
    "CodedStream",
    "CoderParams",
    "applies",
    "decode",
    "encode",
    "encode_best",
    "encode_candidates",
    "pick",
    "entropy_bits",
    "min_bits",
    "symbol_dtype",
]

_Encoder = Callable[[np.ndarray, int], CodedStream]
_Decoder = Callable[[CodedStream, int, int], np.ndarray]

_ENCODERS: dict[str, _Encoder] = {
    "raw": encode_raw,
    "zstd": encode_zstd,
    "huffman": encode_huffman,
    "ans": encode_ans,
    "runs": encode_runs,
}
_DECODERS: dict[str, _Decoder] = {
    "raw": decode_raw,
    "zstd": decode_zstd,
    "huffman": decode_huffman,
    "ans": decode_ans,
    "runs": decode_runs,
}


def applies(coder: str, count: int, alphabet_size: int) -> bool:
    """Whether ``coder`` can code ``count`` symbols over ``alphabet_size`` letters (every coder
    can, except ``runs`` above 32768 letters; see docs/CODERS.md)."""
    return coder != "runs" or _runs_applies(count, alphabet_size)


def encode(symbols: np.ndarray, alphabet_size: int, coder: str) -> CodedStream:
    """Code ``symbols`` (any shape, flattened in C order) with the named coder.

    Raises ``UnsupportedVersion`` for an unknown coder, ``LimitExceeded`` for an alphabet outside
    1..65536 and ``ValueError`` for symbols outside the alphabet or a stream the coder does not
    apply to (see ``applies``; a caller bug).
    """
    check_version(coder, 1)
    flat = prepare_symbols(symbols, alphabet_size)
    return _ENCODERS[coder](flat, int(alphabet_size))


def decode(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Decode exactly ``count`` symbols as a 1-D ``symbol_dtype(alphabet_size)`` array.

    Every field is treated as untrusted file data: inconsistencies raise ``CorruptBlob`` (or
    ``LimitExceeded`` for oversized declarations), unknown coders or versions raise
    ``UnsupportedVersion``.
    """
    if not isinstance(stream, CodedStream):
        raise TypeError(f"decode needs a CodedStream, got {type(stream).__name__}")
    check_version(stream.coder, stream.version)
    k = check_alphabet(alphabet_size)
    n = check_count(count)
    if not isinstance(stream.payload, bytes | bytearray | memoryview):
        raise CorruptBlob(f"{stream.coder} payload is {type(stream.payload).__name__}, not bytes")
    out = _DECODERS[stream.coder](stream, n, k)
    if out.shape != (n,) or out.dtype != symbol_dtype(k):  # internal invariant, cheap to keep
        raise CorruptBlob(f"{stream.coder} decoded {out.shape} {out.dtype}, expected ({n},)")
    return out


FAST_CODERS: tuple[str, ...] = ("raw", "zstd")
"""Coders decoded by C code that releases the GIL, at hundreds of M symbols/s: bit-unpacking in
numpy and libzstd. The others (``huffman``, ``ans``, ``runs``) decode at 5-60 M symbols/s here,
5-50x slower, and hold the GIL (docs/CODERS.md, "Measurements")."""

SLOW_MARGIN_PERCENT = 2
"""``encode_best`` takes a slow coder only when it is more than this many percent smaller than
the smallest fast one: a stream grows by at most this much for a decode 5-50x faster.

Why 2 and not 1 (issue 12): on k-means and uniform index streams of 4-5 bits the slow coders'
edge over zstd is Huffman's integer code lengths (zstd codes its literals with Huffman), just
over 1 % on most ResNet-50 streams (docs/SPEED.md). At a 1 % margin ``ans``/``runs`` won
nearly every large stream and decoding ran several times slower than with zstd; at 2 % they
are kept where they save more than Huffman's usual loss (pruned streams, skewed small
alphabets), and ``packer.encode.Encoder.plan`` holds a whole file to the 1 % rule's size."""

BYTE_WIDE = "zstd8"
"""Label in ``encode_best``'s sizes of the zstd stream over one byte per symbol (K <= 256)."""


def _candidates(flat: np.ndarray, k: int, names: list[str]) -> dict[str, CodedStream]:
    """Each coder's stream, plus zstd over byte-wide symbols when that is not its own width."""
    out: dict[str, CodedStream] = {}
    for name in names:
        out[name] = _ENCODERS[name](flat, k)
        if name == "zstd" and out[name].bits < 8 and k > 1:
            out[BYTE_WIDE] = encode_zstd(flat, k, bits=8)
    return out


def encode_best(
    symbols: np.ndarray, alphabet_size: int, coders: Iterable[str] = CODERS,
    slow_margin_percent: int = SLOW_MARGIN_PERCENT,
) -> tuple[CodedStream, dict[str, int]]:
    """The writer's ``auto`` for one stream: try each coder, and zstd also over byte-wide
    symbols; keep the smallest fast-decoding stream (:data:`FAST_CODERS`) unless a slow one is
    more than ``slow_margin_percent`` smaller (``slow_margin_percent=0``: the smallest of all).
    Among equal sizes the earlier of ``CODERS`` wins (zstd's tight width before its byte-wide
    one), so the choice never depends on the order of ``coders``.

    Returns the chosen stream and ``{candidate: nbytes}`` for every candidate tried (the
    byte-wide zstd one under :data:`BYTE_WIDE`).
    """
    streams = encode_candidates(symbols, alphabet_size, coders)
    return pick(streams, slow_margin_percent), {label: s.nbytes for label, s in streams.items()}


def encode_candidates(symbols: np.ndarray, alphabet_size: int,
                      coders: Iterable[str] = CODERS) -> dict[str, CodedStream]:
    """Every stream ``encode_best`` chooses from, by label, in ``CODERS`` order (the byte-wide
    zstd one, :data:`BYTE_WIDE`, right after zstd)."""
    names = list(dict.fromkeys(coders))
    if not names:
        raise ValueError("encode_best needs at least one coder")
    for name in names:
        check_version(name, 1)
    names.sort(key=CODERS.index)
    flat = prepare_symbols(symbols, alphabet_size)
    k = int(alphabet_size)
    names = [name for name in names if applies(name, flat.size, k)]
    if not names:
        raise ValueError(f"none of the coders {', '.join(coders)} applies to {flat.size} "
                         f"symbols over {k} letters")
    return _candidates(flat, k, names)


def pick(streams: dict[str, CodedStream], slow_margin_percent: int = SLOW_MARGIN_PERCENT
         ) -> CodedStream:
    """``encode_best``'s choice among ``encode_candidates``' streams."""
    ordered = list(streams.values())  # CODERS order, byte-wide zstd right after zstd
    best = min(ordered, key=lambda s: s.nbytes)  # min keeps the first of equal sizes
    fast = [s for s in ordered if s.coder in FAST_CODERS]
    if fast and best.coder not in FAST_CODERS:
        quick = min(fast, key=lambda s: s.nbytes)
        # Integer form of quick <= best * (1 + margin / 100): exact, platform-independent.
        if quick.nbytes * 100 <= best.nbytes * (100 + slow_margin_percent):
            best = quick
    return best
