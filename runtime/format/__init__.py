"""The packed file format v1: preamble, FlatBuffers index, aligned data section."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from runtime.format.preamble import FORMAT_MAJOR, FORMAT_MINOR, MAGIC, PREAMBLE_SIZE

__all__ = ["FORMAT_MAJOR", "FORMAT_MINOR", "MAGIC", "PREAMBLE_SIZE", "PackedFile", "open_packed"]

if TYPE_CHECKING:
    from runtime.format.reader import PackedFile, open_packed


def __getattr__(name: str) -> Any:
    """The reader (numpy, zstandard) is imported on first use: the preamble alone is light."""
    if name in ("PackedFile", "open_packed"):
        return getattr(import_module("runtime.format.reader"), name)
    raise AttributeError(f"module 'runtime.format' has no attribute {name!r}")
