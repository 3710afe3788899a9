"""A reference `runs` coder written from docs/CODERS.md alone, on top of tests/reference_ans.py
(no runtime coder code, no constriction).

It shows that the spec of the `runs` payload is complete: tests/test_reference_decoder.py
decodes real streams of pruned models with it and checks that it rewrites the writer's bytes.
Literal, not fast.
"""

from __future__ import annotations

import struct

import numpy as np

from tests import reference_ans

HEADER = "<HHBIIIIB"  # z, D, J, T, m, W_r, W_v, p
HEADER_BYTES = struct.calcsize(HEADER)
DIRECT = (1, 2, 4, 8, 16, 32, 64)


class RunsStreamError(ValueError):
    """The payload does not describe a valid `runs` stream."""


def _tokens(runs: list[int], direct: int, levels: int) -> list[int]:
    out: list[int] = []
    for r in runs:
        if levels:
            top = direct << (levels - 1)
            out += [direct + levels - 1] * (r // top)
            r %= top
            for j in range(levels - 2, -1, -1):
                if r >= direct << j:
                    out.append(direct + j)
                    r -= direct << j
        out.append(r)
    return out


def _advance(t: int, direct: int) -> int:
    return t + 1 if t < direct else direct << (t - direct)


def _levels(longest: int, direct: int) -> int:
    levels = (longest // direct).bit_length()
    while levels and direct << (levels - 1) > 1 << 31:
        levels -= 1
    return levels


def encode(symbols: np.ndarray, alphabet_size: int) -> bytes:
    symbols = [int(s) for s in np.asarray(symbols).reshape(-1)]
    if not symbols:
        return b""
    counts = np.bincount(symbols, minlength=alphabet_size)
    z = int(np.argmax(counts))  # the first maximum: ties to the lowest symbol
    others = [s for s in symbols if s != z]
    runs, r = [], 0
    for s in symbols:
        if s == z:
            r += 1
        else:
            runs.append(r)
            r = 0
    runs.append(r)
    best = None
    for direct in DIRECT:
        full = _levels(max(runs), direct)
        for levels in dict.fromkeys((min(1, full), full)):
            tokens = _tokens(runs, direct, levels)
            freq, words = reference_ans.encode(np.array(tokens), direct + levels, 15)
            size = 2 * (direct + levels) + len(words)
            if best is None or size < best[0]:
                best = (size, direct, levels, tokens, freq, words)
    _, direct, levels, tokens, run_freq, run_words = best
    value_freq, value_words = reference_ans.encode(np.array(others, dtype=np.int64),
                                                   alphabet_size, 15)
    out = struct.pack(HEADER, z, direct, levels, len(tokens), len(others),
                      len(run_words) // 4, len(value_words) // 4, 15)
    out += np.asarray(run_freq, dtype="<u2").tobytes()
    if others:
        out += np.asarray(value_freq, dtype="<u2").tobytes()
    return out + run_words + value_words


def decode(payload: bytes, count: int, alphabet_size: int) -> np.ndarray:
    if count == 0:
        if payload:
            raise RunsStreamError("payload of an empty stream is not empty")
        return np.zeros(0, dtype=np.int64)
    if alphabet_size > 32768 or count > 2**32 - 2:
        raise RunsStreamError("outside the coder's caps")
    if len(payload) < HEADER_BYTES:
        raise RunsStreamError("shorter than the header")
    z, direct, levels, n_tokens, m, w_r, w_v, p = struct.unpack_from(HEADER, payload)
    if not (z < alphabet_size and direct >= 1 and direct + levels <= 1 << 16
            and (levels == 0 or direct << (levels - 1) <= 1 << 31) and 1 <= p <= 15
            and m < count and m + 1 <= n_tokens <= count + 1 and (m > 0 or w_v == 0)):
        raise RunsStreamError("header out of range")
    at = HEADER_BYTES
    run_freq = np.frombuffer(payload[at:at + 2 * (direct + levels)], "<u2")
    at += 2 * (direct + levels)
    value_freq = None
    if m:
        value_freq = np.frombuffer(payload[at:at + 2 * alphabet_size], "<u2")
        at += 2 * alphabet_size
    if len(payload) != at + 4 * (w_r + w_v):
        raise RunsStreamError("payload length differs from the header")
    run_words, value_words = payload[at:at + 4 * w_r], payload[at + 4 * w_r:]
    try:
        tokens = reference_ans.decode(run_words, run_freq, p, n_tokens,
                                      direct + levels).tolist()
    except reference_ans.AnsStreamError as exc:
        raise RunsStreamError(f"tokens: {exc}") from None
    positions, total, direct_tokens = [], 0, 0
    for t in tokens:
        total += _advance(t, direct)
        if t < direct:
            direct_tokens += 1
            positions.append(total - 1)
    if tokens[-1] >= direct or direct_tokens != m + 1 or total != count + 1:
        raise RunsStreamError("tokens do not add up to the stream")
    out = np.full(count, z, dtype=np.int64)
    if m:
        assert value_freq is not None
        if value_freq[z]:
            raise RunsStreamError("the run symbol has a symbol frequency")
        try:
            values = reference_ans.decode(value_words, value_freq, p, m, alphabet_size)
        except reference_ans.AnsStreamError as exc:
            raise RunsStreamError(f"symbols: {exc}") from None
        out[positions[:-1]] = values
    return out
