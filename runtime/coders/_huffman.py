"""``huffman``: canonical, length-limited (16 bits) Huffman in independently decodable chunks.

Codes are written MSB first into a contiguous bit stream (stream bit ``b`` is bit ``7 - b % 8``
of byte ``b // 8``; the last byte is zero-padded). Symbols are cut into chunks of ``chunk_size``;
``chunk_offsets[i]`` is the stream bit where chunk ``i`` starts. The chunks let the decoder run
all of them in lock-step, one vectorised table lookup per symbol position, instead of a Python
loop per symbol.
"""

from __future__ import annotations

import heapq

import numpy as np

from runtime.coders._common import (
    FORMAT_VERSION,
    MAX_ALPHABET,
    CodedStream,
    int_table,
    symbol_dtype,
)
from runtime.errors import CorruptBlob, LimitExceeded

MAX_CODE_LENGTH = 16
"""Longest code: enough for any alphabet up to 65536 and keeps the decode table at 2**16."""

SMALL_STREAM_BITS = 1 << 18  # doubling tables: ~(log2 chunk) x this x 8 bytes
MAX_CHUNK_SIZE = 1 << 16
"""Largest chunk a decoder accepts; bounds the read-past-the-end padding it allocates."""

_TABLE_BITS = MAX_CODE_LENGTH
_PEEK_MASK = (1 << _TABLE_BITS) - 1


def choose_chunk_size(count: int) -> int:
    """Symbols per chunk: the power of two nearest ``2 * sqrt(count)``, clamped to 512..8192.

    Decoding costs about ``chunk_size`` rounds of numpy calls (fixed overhead each) plus ``count``
    element operations, while every chunk costs 8 stored offset bytes. Growing the chunk with
    ``sqrt(count)`` keeps both overheads small: 4M symbols -> 4096 per chunk, 977 lanes, 7.8 KiB
    of offsets; 10k symbols -> 512 per chunk.
    """
    target = max(1.0, 2.0 * float(count) ** 0.5)
    size = 1 << max(0, round(float(np.log2(target))))
    return int(min(8192, max(512, size)))


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal code lengths for ``counts`` (0 for absent symbols), unlimited depth.

    One-time table building over the alphabet, so a heap over K nodes is fine. Ties break on
    node creation order, which makes the result a pure function of ``counts``.
    """
    k = counts.shape[0]
    lengths = np.zeros(k, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present] = 1
        return lengths
    heap = [(int(counts[s]), i) for i, s in enumerate(present.tolist())]
    heapq.heapify(heap)
    parent: list[int] = [-1] * present.size
    next_id = present.size
    while len(heap) > 1:
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        parent.append(-1)
        heapq.heappush(heap, (wa + wb, next_id))
        next_id += 1
    # Parents are created after their children, so one reverse sweep fills in all depths.
    depth = [0] * next_id
    for node in range(next_id - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[: present.size]
    return lengths


def limit_lengths(counts: np.ndarray, lengths: np.ndarray, limit: int) -> np.ndarray:
    """Cap code lengths at ``limit`` keeping the Kraft sum exactly 1 (JPEG Annex K.3 method).

    Works on the histogram of lengths: each over-long pair of leaves is lifted one level and a
    shorter leaf is split to make room. The lengths are then handed out again in order of
    decreasing count (ties: lower symbol first), so frequent symbols keep the short codes.
    """
    present = np.flatnonzero(lengths)
    if present.size <= 1 or int(lengths.max()) <= limit:
        return lengths
    hist = np.bincount(lengths[present], minlength=int(lengths.max()) + 1).tolist()
    for i in range(len(hist) - 1, limit, -1):
        while hist[i] > 0:
            j = i - 2
            while hist[j] == 0:
                j -= 1
            hist[i] -= 2
            hist[i - 1] += 1
            hist[j + 1] += 2
            hist[j] -= 1
    sorted_lengths = np.repeat(np.arange(limit + 1), hist[: limit + 1])
    order = present[np.lexsort((present, -counts[present]))]
    out = np.zeros_like(lengths)
    out[order] = sorted_lengths
    return out


def code_lengths_for(counts: np.ndarray) -> np.ndarray:
    """Canonical-ready code lengths (uint8, 0 = absent), at most :data:`MAX_CODE_LENGTH`."""
    lengths = limit_lengths(counts, huffman_lengths(counts), MAX_CODE_LENGTH)
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes for ``lengths`` plus the symbols in canonical order (length, symbol).

    Also validates the Kraft inequality, so a tampered table cannot produce overlapping codes.
    """
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    span = np.left_shift(1, _TABLE_BITS - lengths[order].astype(np.int64))
    kraft = int(span.sum())
    if kraft > (1 << _TABLE_BITS):
        raise CorruptBlob("huffman code lengths violate the Kraft inequality")
    starts = np.concatenate(([0], np.cumsum(span)[:-1])).astype(np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.int64)
    codes[order] = starts >> (_TABLE_BITS - lengths[order].astype(np.int64))
    return codes, order


def encode_huffman(symbols: np.ndarray, alphabet_size: int) -> CodedStream:
    """Encode by table lookup, cumulative bit positions and three byte-wise scatters."""
    n = symbols.size
    if n == 0:
        return CodedStream("huffman", FORMAT_VERSION, payload=b"")
    counts = np.bincount(symbols, minlength=alphabet_size)
    lengths = code_lengths_for(counts)
    codes, _ = canonical_codes(lengths)
    sym_len = lengths.astype(np.int64)[symbols]
    sym_code = codes[symbols]
    ends = np.cumsum(sym_len)
    starts = ends - sym_len
    total_bits = int(ends[-1])
    nbytes = (total_bits + 7) // 8
    # Each code (<= 16 bits) at bit offset r (< 8) fits in a 24-bit window starting at byte
    # start // 8. Codes never overlap, so summing the windows' bytes equals OR-ing them.
    window = sym_code << (24 - sym_len - (starts & 7))
    first = starts >> 3
    buf = np.zeros(nbytes + 2, dtype=np.float64)
    for shift, offset in ((16, 0), (8, 1), (0, 2)):
        part = ((window >> shift) & 0xFF).astype(np.float64)
        buf += np.bincount(first + offset, weights=part, minlength=nbytes + 2)
    payload = buf[:nbytes].astype(np.uint8).tobytes()
    chunk_size = choose_chunk_size(n)
    offsets = starts[::chunk_size].astype(np.uint64)
    return CodedStream(
        "huffman",
        FORMAT_VERSION,
        payload=payload,
        code_lengths=lengths,
        chunk_offsets=offsets,
        chunk_size=chunk_size,
    )


def _decode_table(lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """2**16-entry (symbol, length) table; unused entries get length 0 and symbol ``k``."""
    _, order = canonical_codes(lengths)
    span = np.left_shift(1, _TABLE_BITS - lengths[order])
    work = np.dtype(np.uint16) if k < MAX_ALPHABET else np.dtype(np.uint32)
    size = 1 << _TABLE_BITS
    tsym = np.full(size, k, dtype=work)
    tlen = np.zeros(size, dtype=np.uint8)
    used = int(span.sum())
    tsym[:used] = np.repeat(order.astype(work), span)
    tlen[:used] = np.repeat(lengths[order].astype(np.uint8), span)
    return tsym, tlen, work


def decode_huffman(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Decode every chunk in lock-step: ``chunk_size`` iterations, each vectorised over chunks."""
    k = alphabet_size
    dtype = symbol_dtype(k)
    payload = stream.payload
    if count == 0:
        if payload:
            raise CorruptBlob("huffman payload is not empty for an empty stream")
        return np.zeros(0, dtype=dtype)
    lengths = int_table(stream.code_lengths, "huffman code_lengths", k, MAX_CODE_LENGTH)
    chunk_size = stream.chunk_size
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise CorruptBlob(f"huffman chunk size {chunk_size!r} is not a positive integer")
    if chunk_size > MAX_CHUNK_SIZE:
        raise LimitExceeded(f"huffman chunk size {chunk_size} exceeds {MAX_CHUNK_SIZE}")
    chunk_size = int(chunk_size)
    total_bits = 8 * len(payload)
    if count > total_bits:
        raise CorruptBlob(f"huffman payload of {len(payload)} bytes cannot hold {count} symbols")
    n_chunks = -(-count // chunk_size)
    offsets = _check_offsets(stream.chunk_offsets, n_chunks, total_bits)
    if not np.any(lengths):
        raise CorruptBlob("huffman code_lengths table has no symbols")
    tsym, tlen, work = _decode_table(lengths, k)

    # 24-bit big-endian window at every byte; zero padding covers reads past the end by a
    # corrupt chunk (at most 16 bits per step for chunk_size steps), so gathers never go out of
    # bounds. The final position checks below reject any stream that needed that padding.
    pad = 2 * chunk_size + 3
    buf = np.zeros(len(payload) + pad, dtype=np.uint32)
    buf[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    win = (buf[:-2] << 16) | (buf[1:-1] << 8) | buf[2:]

    last_count = count - (n_chunks - 1) * chunk_size
    if total_bits <= SMALL_STREAM_BITS:
        out, pos, last_end = _decode_by_doubling(win, tsym, tlen, offsets, count, chunk_size,
                                                 total_bits)
    else:
        pos = offsets.astype(np.int64)
        out = np.empty((chunk_size, n_chunks), dtype=work)
        last_end = -1
        for i in range(chunk_size):
            peek = (win[pos >> 3] >> (8 - (pos & 7))) & _PEEK_MASK
            out[i] = tsym[peek]
            pos += tlen[peek]
            if i == last_count - 1:
                last_end = int(pos[-1])
        out = out.T.reshape(-1)[:count]

    if n_chunks > 1 and not np.array_equal(pos[:-1], offsets[1:].astype(np.int64)):
        raise CorruptBlob("huffman chunk does not end where the next one starts")
    if last_end > total_bits or total_bits - last_end >= 8:
        raise CorruptBlob(f"huffman stream ends at bit {last_end}, payload holds {total_bits} bits")
    if last_end % 8 and int(payload[-1]) & ((1 << (8 - last_end % 8)) - 1):
        raise CorruptBlob("huffman payload has non-zero padding bits")
    result = out
    if int(result.max()) >= k:
        raise CorruptBlob("huffman payload contains a bit pattern that is not a code")
    return result.astype(dtype, copy=False)


def _decode_by_doubling(win: np.ndarray, tsym: np.ndarray, tlen: np.ndarray,
                        offsets: np.ndarray, count: int, chunk_size: int,
                        total_bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Small streams: the lock-step loop costs chunk_size Python iterations however few
    symbols there are, so instead look up the code at *every* bit position at once and find
    each symbol's position by pointer doubling (log2(chunk_size) vectorised gathers).

    Returns (symbols, end position of each chunk, end position of the last chunk)."""
    bits = np.arange(total_bits + 1, dtype=np.int64)
    peek = (win[bits >> 3] >> (8 - (bits & 7))) & _PEEK_MASK
    raw_next = bits + tlen[peek]
    # A code running past the payload jumps to the end sentinel, which loops on itself.
    overflow = raw_next > total_bits
    nxt = np.where(overflow, total_bits, raw_next).astype(np.int64)
    levels = max(1, int(chunk_size).bit_length())
    jumps = [nxt]
    for _ in range(levels):
        jumps.append(jumps[-1][jumps[-1]])
    index = np.arange(count, dtype=np.int64)
    step = index % chunk_size
    pos = offsets.astype(np.int64)[index // chunk_size]
    for level in range(levels):
        take = (step >> level) & 1 == 1
        pos = np.where(take, jumps[level][pos], pos)
    symbols = tsym[peek[pos]]
    ends = pos + tlen[peek[pos]]
    # A code that would run past the payload marks the stream corrupt.
    ends = np.where(overflow[pos], total_bits + 8, ends)
    n_chunks = len(offsets)
    chunk_last = np.minimum((np.arange(n_chunks) + 1) * chunk_size, count) - 1
    chunk_ends = ends[chunk_last]
    return symbols, chunk_ends, int(chunk_ends[-1])


def _check_offsets(values: object, n_chunks: int, total_bits: int) -> np.ndarray:
    """Chunk offsets must start at 0, never decrease and stay inside the payload."""
    if values is None:
        raise CorruptBlob("huffman chunk_offsets table is missing")
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CorruptBlob("huffman chunk_offsets must be a 1-D integer array")
    if arr.shape[0] != n_chunks:
        raise CorruptBlob(f"huffman has {arr.shape[0]} chunk offsets, expected {n_chunks}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise CorruptBlob("huffman chunk offsets are negative")
    if int(arr.max()) > total_bits:
        raise CorruptBlob("huffman chunk offset points past the payload")
    offsets = arr.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise CorruptBlob("huffman chunk offsets must start at 0 and never decrease")
    return offsets
