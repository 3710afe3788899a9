"""A reference `huffman` writer written from docs/CODERS.md alone (no runtime imports).

`tests/test_reference_decoder.py` checks that it reproduces the writer's code lengths and
bytes on real streams and on the golden file, i.e. that the spec pins the writer down.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LENGTH = 16


def tree_lengths(counts: list[int]) -> list[int]:
    """Unlimited Huffman lengths: a min-heap of (weight, id); leaves are ids 0..M-1 in
    ascending symbol order, each merge of the two smallest creates the next id."""
    present = [s for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths
    heap = [(counts[s], leaf) for leaf, s in enumerate(present)]
    heapq.heapify(heap)
    children: dict[int, tuple[int, int]] = {}
    next_id = len(present)
    while len(heap) > 1:
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        children[next_id] = (a, b)
        heapq.heappush(heap, (wa + wb, next_id))
        next_id += 1
    stack = [(heap[0][1], 0)]
    while stack:
        node, depth = stack.pop()
        if node in children:
            stack += [(child, depth + 1) for child in children[node]]
        else:
            lengths[present[node]] = depth
    return lengths


def limited_lengths(counts: list[int]) -> list[int]:
    """Tree lengths, or when one exceeds 16: the JPEG K.3 histogram adjustment, then the
    lengths in ascending order dealt to symbols by decreasing count (ties: lower symbol)."""
    lengths = tree_lengths(counts)
    present = [s for s, n in enumerate(lengths) if n]
    if len(present) <= 1 or max(lengths) <= MAX_LENGTH:
        return lengths
    bits = [0] * (max(lengths) + 1)
    for s in present:
        bits[lengths[s]] += 1
    while len(bits) - 1 > MAX_LENGTH:  # lift pairs off the longest length until none is left
        longest = len(bits) - 1
        if bits[longest] == 0:
            bits.pop()
            continue
        shorter = max(n for n in range(1, longest - 1) if bits[n])  # split a leaf here
        bits[longest] -= 2
        bits[longest - 1] += 1
        bits[shorter + 1] += 2
        bits[shorter] -= 1
    dealt = [n for n in range(1, MAX_LENGTH + 1) for _ in range(bits[n])]
    out = [0] * len(counts)
    for s, n in zip(sorted(present, key=lambda s: (-counts[s], s)), dealt, strict=True):
        out[s] = n
    return out


def canonical_codes(lengths: list[int]) -> dict[int, int]:
    """Symbols sorted by (length, symbol) receive consecutive codes."""
    codes, code, previous = {}, 0, 0
    for s in sorted((s for s, n in enumerate(lengths) if n), key=lambda s: (lengths[s], s)):
        code <<= lengths[s] - previous
        codes[s] = code
        code += 1
        previous = lengths[s]
    return codes


def chunk_size(count: int) -> int:
    """The table in docs/CODERS.md."""
    if count < 1 << 17:
        return 512
    if count <= 1 << 19:
        return 1024
    if count < 1 << 21:
        return 2048
    if count <= 1 << 23:
        return 4096
    return 8192


def encode(symbols: np.ndarray, alphabet_size: int) -> tuple[list[int], bytes, list[int], int]:
    """(code_lengths, payload, chunk_offsets, chunk_size) for a non-empty stream."""
    symbols = np.asarray(symbols).reshape(-1).tolist()
    counts = [0] * alphabet_size
    for s in symbols:
        counts[s] += 1
    lengths = limited_lengths(counts)
    codes = canonical_codes(lengths)
    size = chunk_size(len(symbols))
    bits: list[str] = []
    offsets, position = [], 0
    for i, s in enumerate(symbols):
        if i % size == 0:
            offsets.append(position)
        bits.append(format(codes[s], f"0{lengths[s]}b"))  # MSB first
        position += lengths[s]
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    payload = int(stream, 2).to_bytes(len(stream) // 8, "big") if stream else b""
    return lengths, payload, offsets, size
