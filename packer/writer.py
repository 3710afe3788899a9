"""Lay out and write a packed file: preamble, FlatBuffers index, aligned data section."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import zstandard

from packer.encode import DataSection
from packer.index_builder import build_index
from runtime.atomic import atomic_write
from runtime.format.preamble import FLAG_INDEX_ZSTD, PREAMBLE_SIZE, Preamble
from runtime.format.records import ModelRecord


@dataclass(frozen=True)
class Layout:
    """A file's bytes as chunks, and the facts its size report needs (known before writing)."""

    preamble: Preamble
    index_raw_size: int  # the FlatBuffers index before zstd
    chunks: Iterable[bytes]


def layout(model: ModelRecord, data: DataSection) -> Layout:
    """Deterministic for the same records and data."""
    index = build_index(model)
    raw_size = len(index)
    frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(index)
    flags = FLAG_INDEX_ZSTD if len(frame) < len(index) else 0
    index = frame if flags else index
    alignment = data.alignment
    index_end = PREAMBLE_SIZE + len(index)
    data_offset = index_end + (-index_end % alignment)
    preamble = Preamble(
        index_offset=PREAMBLE_SIZE, index_size=len(index), data_offset=data_offset,
        data_size=data.size, file_size=data_offset + data.size, alignment=alignment,
        index_crc32=zlib.crc32(index), flags=flags,
    )
    chunks = [preamble.pack(), index, bytes(data_offset - index_end), *data.parts]
    return Layout(preamble, raw_size, chunks)


def write_packed(path: str | os.PathLike, model: ModelRecord, data: DataSection) -> Layout:
    """Write atomically; returns the layout written."""
    written = layout(model, data)
    atomic_write(path, written.chunks)
    return written
