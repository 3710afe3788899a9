"""``raw`` and ``zstd``: fixed-width little-endian bit-packing, optionally zstd-compressed.

Bit-packing at ``bits`` bits puts symbol ``i``'s bit ``j`` at stream bit ``i * bits + j``, with
stream bit ``b`` stored in byte ``b // 8`` at weight ``2 ** (b % 8)``. At 8 and 16 bits this is
exactly the uint8 / little-endian uint16 array bytes, which the fast paths below rely on.
"""

from __future__ import annotations

import numpy as np
import zstandard

from runtime.coders._common import (
    FORMAT_VERSION,
    CodedStream,
    min_bits,
    packed_nbytes,
    symbol_dtype,
)
from runtime.errors import CorruptBlob, LimitExceeded

ZSTD_LEVEL = 19
"""Fixed level: the bitstream must be a pure function of the input for reproducible files."""

MAX_ZSTD_EXPANSION = (128 << 10) // 4
"""Most bytes one zstd byte can stand for: a block holds at most 128 KiB of content and takes
at least 4 bytes (3-byte header + 1 RLE byte). A frame declaring more is refused unread."""


def pack(symbols: np.ndarray, bits: int) -> bytes:
    """Bit-pack ``symbols`` (values below ``2 ** bits``) at ``bits`` bits, LSB first."""
    if bits == 0 or symbols.size == 0:
        return b""
    if bits == 8:
        return symbols.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return symbols.astype("<u2", copy=False).tobytes()
    return _pack_groups(symbols, bits)


def _pack_groups(symbols: np.ndarray, bits: int) -> bytes:
    """Pack 8 symbols at a time into a 128-bit (two uint64) little-endian accumulator.

    8 symbols fill exactly ``bits`` bytes, so each group's accumulator contributes its low
    ``bits`` bytes; the trailing partial group is zero-padded, which leaves zero padding bits.
    """
    n = symbols.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = symbols
    lanes = padded.reshape(groups, 8)
    acc = np.zeros((groups, 2), dtype="<u8")
    lo, hi = acc[:, 0], acc[:, 1]
    for j in range(8):
        value, offset = lanes[:, j], j * bits
        if offset < 64:
            lo |= value << np.uint64(offset)  # bits beyond 64 fall off, hi gets them below
        if offset + bits > 64:
            hi |= (
                value << np.uint64(offset - 64) if offset >= 64 else value >> np.uint64(64 - offset)
            )
    nbytes = -(-n * bits // 8)
    return acc.view(np.uint8).reshape(groups, 16)[:, :bits].tobytes()[:nbytes]


def unpack(payload: bytes, count: int, bits: int, alphabet_size: int, owned: bool = False
           ) -> np.ndarray:
    """Inverse of :func:`pack`; the caller has checked ``len(payload)`` already. ``owned``:
    the payload is the caller's own bytes object, so the result may be a (read-only) view of it
    instead of a copy (a payload in a memory-mapped file must be copied)."""
    dtype = symbol_dtype(alphabet_size)
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=dtype)
    raw = np.frombuffer(payload, dtype=np.uint8)
    tail_bits = (count * bits) % 8
    if tail_bits and int(raw[-1]) >> tail_bits:
        raise CorruptBlob("bit-packed payload has non-zero padding bits")
    if bits == 8:
        out = raw if owned else raw.copy()
    elif bits == 16:
        out = raw.view("<u2") if owned else raw.view("<u2").copy()
    elif 8 % bits == 0:
        out = _unpack_whole_bytes(raw, count, bits)
    else:
        out = _unpack_groups(raw, count, bits)
    out = out.astype(dtype, copy=False)
    if int(alphabet_size) < (1 << bits) and count and int(out.max()) >= alphabet_size:
        raise CorruptBlob(f"bit-packed payload holds a symbol >= alphabet size {alphabet_size}")
    return out


def _unpack_whole_bytes(raw: np.ndarray, count: int, bits: int) -> np.ndarray:
    """1, 2 or 4 bits: every byte holds 8 // bits whole symbols, the first in its low bits;
    one shift and one mask over all bytes per symbol of a byte (uniform 4-bit codes, K <= 16
    indices), each a long numpy loop (a broadcast over the byte's 2-8 symbols runs numpy's
    inner loop that many elements at a time, ~10x slower)."""
    per = 8 // bits
    out = np.empty((raw.size, per), dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for j in range(per):
        column = out[:, j]
        np.right_shift(raw, np.uint8(j * bits), out=column)
        if j < per - 1:  # the last symbol has no bits above it
            np.bitwise_and(column, mask, out=column)
    return out.reshape(-1)[:count]


def _unpack_groups(raw: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Unpack via the 8-symbol period: 8 symbols always fill exactly ``bits`` whole bytes.

    Symbol ``j`` of every group starts at byte ``j * bits // 8`` of the group, bit
    ``j * bits % 8``, and spans at most 3 bytes; strided column views read it for all groups at
    once, so the work is 8 vectorised steps regardless of ``count``.
    """
    groups = -(-count // 8)
    buf = np.zeros(groups * bits + 2, dtype=np.uint8)
    buf[: raw.size] = raw
    span = groups * bits
    mask = (1 << bits) - 1
    out = np.empty((groups, 8), dtype=np.uint16)
    for j in range(8):
        first, shift = divmod(j * bits, 8)
        window = buf[first : first + span : bits].astype(np.uint32)
        window |= buf[first + 1 : first + 1 + span : bits].astype(np.uint32) << 8
        if shift + bits > 16:
            window |= buf[first + 2 : first + 2 + span : bits].astype(np.uint32) << 16
        out[:, j] = (window >> shift) & mask
    return out.reshape(-1)[:count]


def zstd_bits(alphabet_size: int) -> int:
    """Packing width before zstd: tight below a byte, byte-aligned above (zstd likes bytes)."""
    b = min_bits(alphabet_size)
    return b if b <= 8 else 16


def encode_raw(symbols: np.ndarray, alphabet_size: int) -> CodedStream:
    """Tight bit-packing: the baseline every other coder must beat."""
    bits = min_bits(alphabet_size)
    return CodedStream("raw", FORMAT_VERSION, payload=pack(symbols, bits), bits=bits)


def encode_zstd(symbols: np.ndarray, alphabet_size: int, bits: int | None = None) -> CodedStream:
    """zstd over the packed bytes: wins on runs and repeats that order-0 coders cannot see.

    ``bits`` overrides the packing width (readers accept any from ``min_bits(K)`` to 16): at 8
    bits each symbol is one byte, which zstd's Huffman-coded literals compress to near the
    order-0 bound when the symbols have no byte-aligned structure at their tight width."""
    bits = zstd_bits(alphabet_size) if bits is None else bits
    compressor = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_content_size=True, write_checksum=False, threads=0
    )
    return CodedStream("zstd", FORMAT_VERSION, bits=bits,
                        payload=compressor.compress(pack(symbols, bits)))


def _check_bits(stream: CodedStream, alphabet_size: int) -> int:
    bits = stream.bits
    if not isinstance(bits, int | np.integer) or not min_bits(alphabet_size) <= bits <= 16:
        raise CorruptBlob(
            f"{stream.coder} bit width {bits!r} cannot hold alphabet size {alphabet_size}"
        )
    return int(bits)


def decode_raw(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Unpack after checking the payload is exactly ``count * bits`` bits long."""
    bits = _check_bits(stream, alphabet_size)
    expected = packed_nbytes(count, bits)
    if len(stream.payload) != expected:
        raise CorruptBlob(
            f"raw payload is {len(stream.payload)} bytes, expected {expected} for {count} "
            f"symbols at {bits} bits"
        )
    return unpack(stream.payload, count, bits, alphabet_size)


def decode_zstd(stream: CodedStream, count: int, alphabet_size: int) -> np.ndarray:
    """Decompress with the output size pinned to what ``count`` implies (no bomb, no tail).

    The frame's declared size must equal what ``count`` implies and be one a payload of this
    length can really hold, both checked before the output is allocated."""
    bits = _check_bits(stream, alphabet_size)
    expected = packed_nbytes(count, bits)
    if expected > MAX_ZSTD_EXPANSION * len(stream.payload):
        raise CorruptBlob(f"a {len(stream.payload)}-byte zstd payload cannot hold the "
                          f"{expected} bytes {count} symbols need")
    try:
        declared = zstandard.get_frame_parameters(stream.payload).content_size
    except zstandard.ZstdError as exc:
        raise CorruptBlob(f"zstd payload has no valid frame header: {exc}") from exc
    if declared != expected:
        raise CorruptBlob(f"zstd frame declares {declared} bytes, expected {expected}")
    try:
        packed = zstandard.ZstdDecompressor().decompress(
            stream.payload, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptBlob(f"zstd payload does not decompress: {exc}") from exc
    except MemoryError:
        raise LimitExceeded(f"not enough memory to decompress {expected} bytes") from None
    if len(packed) != expected:
        raise CorruptBlob(f"zstd payload decompressed to {len(packed)} bytes, expected {expected}")
    return unpack(packed, count, bits, alphabet_size, owned=True)
