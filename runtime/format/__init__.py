"""The packed file format v1: preamble, FlatBuffers index, aligned data section."""

from runtime.format.preamble import FORMAT_MAJOR, FORMAT_MINOR, MAGIC, PREAMBLE_SIZE
from runtime.format.reader import PackedFile, open_packed

__all__ = ["FORMAT_MAJOR", "FORMAT_MINOR", "MAGIC", "PREAMBLE_SIZE", "PackedFile", "open_packed"]
