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
from runtime.format.features import format_minor
from runtime.format.preamble import (
    FLAG_INDEX_ZSTD,
    FLAG_REQUIRED_FEATURES,
    PREAMBLE_SIZE,
    Preamble,
)
from runtime.format.records import ModelRecord


@dataclass(frozen=True)
class Layout:
    """A file's bytes as chunks, and the facts its size report needs (known before writing)."""

    preamble: Preamble
    index_raw_size: int  # the FlatBuffers index before zstd
    chunks: Iterable[bytes]


def layout(model: ModelRecord, data: DataSection) -> Layout:
    """Deterministic for the same records and data.

    The preamble carries the lowest format minor that describes the file: 1.0 unless it
    requires features (runtime.format.features), so older readers open every file they can.
    """
    index = build_index(model)
    raw_size = len(index)
    frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(index)
    compressed = len(frame) < len(index)
    index = frame if compressed else index
    flags = ((FLAG_INDEX_ZSTD if compressed else 0)
             | (FLAG_REQUIRED_FEATURES if model.required_features else 0))
    alignment = data.alignment
    index_end = PREAMBLE_SIZE + len(index)
    data_offset = index_end + (-index_end % alignment)
    preamble = Preamble(
        index_offset=PREAMBLE_SIZE, index_size=len(index), data_offset=data_offset,
        data_size=data.size, file_size=data_offset + data.size, alignment=alignment,
        index_crc32=zlib.crc32(index), minor=format_minor(model.required_features),
        flags=flags,
    )
    chunks = [preamble.pack(), index, bytes(data_offset - index_end), *data.parts]
    return Layout(preamble, raw_size, chunks)


def write_packed(path: str | os.PathLike, model: ModelRecord, data: DataSection) -> Layout:
    """Write atomically; returns the layout written."""
    written = layout(model, data)
    atomic_write(path, written.chunks)
    return written
