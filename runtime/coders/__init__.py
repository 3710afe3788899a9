"""Lossless entropy coders for integer symbol streams (codebook indices, raw tensor bytes).

``encode`` turns a numpy symbol array over an alphabet of ``K`` letters (1 <= K <= 65536) into a
:class:`CodedStream`; ``decode`` inverts it from the stored fields alone. ``encode_best`` tries
several coders and keeps the one with the smallest honest cost (payload plus parameter tables).
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
from runtime.errors import CorruptBlob

__all__ = [
    "CODERS",
    "FORMAT_VERSION",
    "MAX_ZSTD_EXPANSION",
    "CodedStream",
    "CoderParams",
    "decode",
    "encode",
    "encode_best",
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
}
_DECODERS: dict[str, _Decoder] = {
    "raw": decode_raw,
    "zstd": decode_zstd,
    "huffman": decode_huffman,
    "ans": decode_ans,
}


def encode(symbols: np.ndarray, alphabet_size: int, coder: str) -> CodedStream:
    """Code ``symbols`` (any shape, flattened in C order) with the named coder.

    Raises ``UnsupportedVersion`` for an unknown coder, ``LimitExceeded`` for an alphabet outside
    1..65536 and ``ValueError`` for symbols outside the alphabet (a caller bug).
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


def encode_best(
    symbols: np.ndarray, alphabet_size: int, coders: Iterable[str] = CODERS
) -> tuple[CodedStream, dict[str, int]]:
    """Try each coder and keep the smallest by ``nbytes``; ties go to the earlier name in
    ``CODERS`` so the choice never depends on the order of ``coders``.

    Returns the winning stream and ``{coder: nbytes}`` for every coder tried.
    """
    names = list(dict.fromkeys(coders))
    if not names:
        raise ValueError("encode_best needs at least one coder")
    for name in names:
        check_version(name, 1)
    names.sort(key=CODERS.index)
    flat = prepare_symbols(symbols, alphabet_size)
    k = int(alphabet_size)
    streams = [_ENCODERS[name](flat, k) for name in names]
    best = min(streams, key=lambda s: s.nbytes)  # min keeps the first of equal sizes
    return best, {s.coder: s.nbytes for s in streams}
