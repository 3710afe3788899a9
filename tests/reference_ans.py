"""A reference `ans` coder written from docs/CODERS.md alone: Python integers and numpy, no
constriction.

It exists to show that the spec is complete: `tests/test_reference_decoder.py` decodes real
streams with it and checks that it reproduces the writer's bytes. It is deliberately literal
(one loop step per symbol, the state a Python int), not fast.
"""

from __future__ import annotations

import bisect

import numpy as np

CODING_PRECISION = 24  # the model's fixed-point precision, whatever the stored table's
WORD_BITS = 32
STATE_BITS = 64
MAX_STORED_PRECISION = 24


class AnsStreamError(ValueError):
    """The stored fields do not describe a valid `ans` stream."""


def quantize(counts: np.ndarray, precision: int = 24) -> np.ndarray:
    """The stored table: every present symbol gets 1, the remaining units go out
    proportionally, the leftovers to the largest remainders (ties: lower symbol)."""
    counts = [int(c) for c in counts]
    present = [s for s, c in enumerate(counts) if c > 0]
    n = sum(counts)
    spare = (1 << precision) - len(present)
    share = {s: counts[s] * spare // n for s in present}
    remainder = {s: counts[s] * spare % n for s in present}
    left = spare - sum(share.values())
    for s in sorted(present, key=lambda s: (-remainder[s], s))[:left]:
        share[s] += 1
    freq = np.zeros(len(counts), dtype=np.uint32)
    for s in present:
        freq[s] = share[s] + 1
    return freq


def coding_model(freq: np.ndarray, precision: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(present symbols, left cumulative, probability) of the model the payload is coded with:
    cdf[i] = i + floor(F_i * (2**24 - m) / 2**precision) over the m present symbols."""
    present = np.flatnonzero(freq)
    m = present.size
    cdf, cumulative = [], 0
    for i, s in enumerate(present.tolist()):
        cdf.append(i + cumulative * ((1 << CODING_PRECISION) - m) // (1 << precision))
        cumulative += int(freq[s])
    prob = [b - a for a, b in zip(cdf, [*cdf[1:], 1 << CODING_PRECISION], strict=True)]
    return present, cdf, prob


def encode(symbols: np.ndarray, alphabet_size: int,
           precision: int = 24) -> tuple[np.ndarray | None, bytes]:
    """(stored frequencies, payload) exactly as the writer produces them (the `ans` writer
    stores its table at precision 24; the `runs` coder's sub-streams at 15)."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return None, b""
    freq = quantize(np.bincount(symbols, minlength=alphabet_size), precision)
    present, cdf, prob = coding_model(freq, precision)
    if present.size == 1:
        return freq, b""
    sub = (np.cumsum(freq > 0) - 1)[symbols].tolist()
    words: list[int] = []
    state = 0
    for s in reversed(sub):  # last symbol first: the decoder pops the first one first
        p = prob[s]
        if state >> (STATE_BITS - CODING_PRECISION) >= p:
            words.append(state & 0xFFFFFFFF)
            state >>= WORD_BITS
        state = ((state // p) << CODING_PRECISION) | (cdf[s] + state % p)
    if state:  # flush: low word, then the high one unless it is zero
        words.append(state & 0xFFFFFFFF)
        if state >> WORD_BITS:
            words.append(state >> WORD_BITS)
    return freq, np.asarray(words, dtype="<u4").tobytes()


def decode(payload: bytes, freq: np.ndarray | None, precision: int, count: int,
           alphabet_size: int) -> np.ndarray:
    """`count` symbols, or AnsStreamError for anything the spec calls invalid."""
    if count == 0:
        if payload:
            raise AnsStreamError("payload of an empty stream is not empty")
        return np.zeros(0, dtype=np.int64)
    if not 1 <= precision <= MAX_STORED_PRECISION:
        raise AnsStreamError("precision outside 1..24")
    if freq is None or len(freq) != alphabet_size:
        raise AnsStreamError("frequency table length differs from the alphabet")
    if sum(int(f) for f in freq) != 1 << precision:
        raise AnsStreamError("frequencies do not sum to 2**precision")
    present, cdf, prob = coding_model(np.asarray(freq), precision)
    if present.size == 1:
        if payload:
            raise AnsStreamError("single-symbol stream with a payload")
        return np.full(count, present[0], dtype=np.int64)
    if not payload or len(payload) % 4:
        raise AnsStreamError("payload is not a positive whole number of 32-bit words")
    words = np.frombuffer(payload, dtype="<u4").tolist()
    top = len(words)  # the words form a stack; the last one is read first
    top -= 1
    state = words[top]
    if state == 0:
        raise AnsStreamError("the last word is zero")
    if top:
        top -= 1
        state = (state << WORD_BITS) | words[top]
    mask = (1 << CODING_PRECISION) - 1
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        quantile = state & mask
        s = bisect.bisect_right(cdf, quantile) - 1
        state = (state >> CODING_PRECISION) * prob[s] + quantile - cdf[s]
        if state < 1 << WORD_BITS and top:
            top -= 1
            state = (state << WORD_BITS) | words[top]
        out[i] = s
    if state != 0 or top != 0:
        raise AnsStreamError("data left over after the declared symbol count")
    return present[out]
