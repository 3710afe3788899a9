"""``runs``: the most frequent symbol as run lengths, every other symbol as itself.

Built for pruned tensors, whose index streams are 50-95 % one symbol (the zero cluster). The
stream is split into (1) the run of the run symbol ``z`` before each other symbol (and before
the end), written as tokens, and (2) the other symbols in order. A token t < D stands for "t
times z, then the next other symbol"; a token D + j for "D * 2^j more z" (j < J), so a long
run (a pruned kernel, row or layer) costs a few tokens, however long. Both parts are coded with
the ``ans`` coder's model and state machine (docs/CODERS.md), their frequency tables stored at
15-bit precision as u16 (half an ``ans`` table's bytes). For independent zeros this costs what
order-0 ANS costs (a geometric run law is an i.i.d. mask); runs longer or shorter than
independence predicts make it cheaper.

Payload (little-endian; docs/CODERS.md is normative)::

    u16 z | u16 D | u8 J | u32 T | u32 m | u32 W_r | u32 W_v | u8 p     header, 22 bytes
    u16[D + J]  token frequencies, summing to 2^p
    u16[K]      other-symbol frequencies, f[z] = 0          (only when m > 0)
    u32[W_r]    ans words of the T tokens
    u32[W_v]    ans words of the m other symbols
"""

from __future__ import annotations

import struct

import numpy as np

from runtime.coders._ans import decode_ans, encode_ans
from runtime.coders._common import FORMAT_VERSION, CodedStream, symbol_dtype
from runtime.errors import CorruptBlob, LimitExceeded

HEADER = struct.Struct("<HHBIIIIB")
MAX_ALPHABET = 1 << 15
"""Largest alphabet: z fits a u16 and every table fits u16 entries at precision 15."""
MAX_PRECISION = 15
PRECISION = 15
MAX_COUNT = (1 << 32) - 2
"""Largest stream: the token count T <= n + 1 must fit its u32 field."""
MAX_STEP = 1 << 31
"""Largest run step D * 2^(J-1): T * step stays below 2^63, so sums never overflow int64."""
DIRECT = (1, 2, 4, 8, 16, 32, 64)
"""Direct token counts D the writer tries, each with J = 1 and with every level needed."""


def applies(count: int, alphabet_size: int) -> bool:
    """Whether the coder can represent a stream of this size and alphabet."""
    return alphabet_size <= MAX_ALPHABET and count <= MAX_COUNT


def run_lengths(symbols: np.ndarray, z: int) -> np.ndarray:
    """How many z precede each symbol != z, and (last entry) the end of the stream."""
    others = np.flatnonzero(symbols != z)
    return np.diff(np.concatenate(([-1], others, [symbols.size]))) - 1


def run_tokens(runs: np.ndarray, direct: int, levels: int) -> np.ndarray:
    """Each run greedily from the longest step down: `D + j` for every whole D * 2^j left
    (several of the top step, at most one of each lower), then the remainder (< D)."""
    left = runs.astype(np.int64)
    counts = []
    for j in range(levels - 1, -1, -1):
        counts.append(left // (direct << j))
        left = left - counts[-1] * (direct << j)
    per_run = sum(counts, np.ones_like(left))
    starts = np.cumsum(per_run) - per_run
    tokens = np.empty(int(per_run.sum()), dtype=np.int64)
    placed = np.zeros_like(left)
    for j, count in zip(range(levels - 1, -1, -1), counts, strict=True):
        total = int(count.sum())
        if total:
            first = np.repeat(starts + placed, count)
            ramp = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            tokens[first + ramp] = direct + j
        placed += count
    tokens[starts + placed] = left
    return tokens


def token_steps(direct: int, levels: int) -> np.ndarray:
    """Positions each token value advances: t + 1 below D, D * 2^(t - D) from D on."""
    return np.concatenate([np.arange(1, direct + 1, dtype=np.int64),
                           direct << np.arange(levels, dtype=np.int64)])


def _levels_needed(longest: int, direct: int) -> int:
    levels = (longest // direct).bit_length()
    while levels and direct << (levels - 1) > MAX_STEP:
        levels -= 1
    return levels


def _u16(freq: np.ndarray | None) -> bytes:
    assert freq is not None and int(freq.max(initial=0)) < 1 << 16
    return freq.astype("<u2").tobytes()


def encode_runs(symbols: np.ndarray, alphabet_size: int) -> CodedStream:
    """z = the most frequent symbol (ties: the lowest); among the (D, J) of `DIRECT` with one
    level or every level the longest run needs, the smallest token table + payload."""
    n = symbols.size
    if not applies(n, alphabet_size):
        raise ValueError(f"the runs coder takes alphabets of at most {MAX_ALPHABET} symbols "
                         f"and streams of at most {MAX_COUNT}, not {alphabet_size} / {n}")
    if n == 0:
        return CodedStream("runs", FORMAT_VERSION, payload=b"")
    z = int(np.argmax(np.bincount(symbols, minlength=alphabet_size)))
    others = symbols[symbols != z]
    values = encode_ans(others, alphabet_size, PRECISION) if others.size else None
    runs = run_lengths(symbols, z)
    longest = int(runs.max())
    best: tuple[int, int, int, np.ndarray, CodedStream] | None = None
    for direct in DIRECT:
        for levels in dict.fromkeys((min(1, _levels_needed(longest, direct)),
                                     _levels_needed(longest, direct))):
            tokens = run_tokens(runs, direct, levels)
            coded = encode_ans(tokens, direct + levels, PRECISION)
            size = 2 * (direct + levels) + len(coded.payload)
            if best is None or size < best[0]:
                best = (size, direct, levels, tokens, coded)
    assert best is not None
    _, direct, levels, tokens, coded_runs = best
    value_words = b"" if values is None else values.payload
    header = HEADER.pack(z, direct, levels, tokens.size, others.size,
                         len(coded_runs.payload) // 4, len(value_words) // 4, PRECISION)
    parts = [header, _u16(coded_runs.frequencies)]
    if values is not None:
        parts.append(_u16(values.frequencies))
    parts += [coded_runs.payload, value_words]
    return CodedStream("runs", FORMAT_VERSION, payload=b"".join(parts))


def _sub_stream(payload: bytes, freq: np.ndarray, precision: int) -> CodedStream:
    return CodedStream("ans", FORMAT_VERSION, payload=payload, frequencies=freq.astype(np.uint32),
                       precision=precision)


def decode_runs(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Check the header against `count`, `alphabet_size` and the payload length, decode
    the tokens, place the other symbols; every inconsistency is CorruptBlob."""
    dtype = symbol_dtype(alphabet_size)
    payload = bytes(stream.payload)
    if count == 0:
        if payload:
            raise CorruptBlob("runs payload is not empty for an empty stream")
        return np.zeros(0, dtype=dtype)
    if not applies(count, alphabet_size):
        raise LimitExceeded(f"runs coder: alphabet {alphabet_size} or count {count} over its "
                            f"caps ({MAX_ALPHABET}, {MAX_COUNT})")
    if len(payload) < HEADER.size:
        raise CorruptBlob(f"runs payload of {len(payload)} bytes is shorter than its header")
    z, direct, levels, n_tokens, m, w_runs, w_values, precision = HEADER.unpack_from(payload)
    if z >= alphabet_size:
        raise CorruptBlob(f"runs symbol {z} is outside the alphabet of {alphabet_size}")
    if (direct < 1 or direct + levels > 1 << 16 or (levels and direct << (levels - 1) > MAX_STEP)
            or not 1 <= precision <= MAX_PRECISION):
        raise CorruptBlob(f"runs tokens D={direct} J={levels} or precision {precision} out "
                          f"of range")
    if m >= count or not m + 1 <= n_tokens <= count + 1:
        raise CorruptBlob(f"runs header declares {m} other symbols in {n_tokens} tokens for "
                          f"a stream of {count}")
    if m == 0 and w_values:
        raise CorruptBlob("runs payload has symbol words but no symbols")
    table_runs = 2 * (direct + levels)
    table_values = 2 * alphabet_size if m else 0
    start = HEADER.size + table_runs + table_values
    if len(payload) != start + 4 * (w_runs + w_values):
        raise CorruptBlob(f"runs payload is {len(payload)} bytes, its header describes "
                          f"{start + 4 * (w_runs + w_values)}")
    run_freq = np.frombuffer(payload, "<u2", direct + levels, HEADER.size)
    runs_end = start + 4 * w_runs
    tokens = decode_ans(_sub_stream(payload[start:runs_end], run_freq, precision),
                        n_tokens, direct + levels).astype(np.int64)
    is_symbol = tokens < direct
    ends = np.cumsum(token_steps(direct, levels)[tokens])  # < 2^63: T <= 2^32, steps <= 2^31
    if not is_symbol[-1] or int(is_symbol.sum()) != m + 1 or int(ends[-1]) != count + 1:
        raise CorruptBlob("runs tokens do not add up to the declared stream")
    out = np.full(count, z, dtype=dtype)
    if m:
        value_freq = np.frombuffer(payload, "<u2", alphabet_size, HEADER.size + table_runs)
        if value_freq[z]:
            raise CorruptBlob("runs symbol table gives the run symbol a frequency")
        values = decode_ans(_sub_stream(payload[runs_end:], value_freq, precision), m,
                            alphabet_size)
        out[ends[is_symbol][:-1] - 1] = values
    return out
