"""The fixed 64-byte little-endian preamble at byte 0 of every packed file."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from runtime.errors import (
    BadMagic,
    LayoutError,
    LimitExceeded,
    TruncatedFile,
    UnsupportedVersion,
)

# PNG-style magic: non-text high byte first, CR LF, ^Z, LF catch transfer-mode damage.
MAGIC = b"\x89WPK\r\n\x1a\n"
FORMAT_MAJOR = 1
FORMAT_MINOR = 3  # the newest minor this reader knows; a writer stamps the lowest a file needs
PREAMBLE_SIZE = 64
INDEX_IDENTIFIER = b"WPK1"
DEFAULT_ALIGNMENT = 64
# Preamble flag bits. FLAG_INDEX_ZSTD: the index is stored as one zstd frame around the
# FlatBuffer (its repeated vtables, names and zero fields shrink about 3-4x).
# FLAG_REQUIRED_FEATURES (format 1.1): the index names features the reader must implement
# (`Model.required_features`, runtime.format.features); format 1.0 readers refuse the file
# because they do not know the bit, which is the point of setting it.
FLAG_INDEX_ZSTD = 1
FLAG_REQUIRED_FEATURES = 2
KNOWN_FLAGS = FLAG_INDEX_ZSTD | FLAG_REQUIRED_FEATURES
MAX_ALIGNMENT = 1 << 20
MAX_INDEX_BYTES = 256 << 20  # stored index, and the inflated one when zstd-compressed
MIN_INDEX_BYTES = 8  # a FlatBuffer's root offset and file identifier

# magic, major, minor, flags, index_offset, index_size, data_offset, data_size, file_size,
# alignment, index_crc32. Unknown flag bits are refused; a minor version may define new ones.
_LAYOUT = struct.Struct("<8sHHIQQQQQII")
assert _LAYOUT.size == PREAMBLE_SIZE


@dataclass(frozen=True)
class Preamble:
    index_offset: int
    index_size: int
    data_offset: int
    data_size: int
    file_size: int
    alignment: int
    index_crc32: int
    major: int = FORMAT_MAJOR
    minor: int = FORMAT_MINOR
    flags: int = 0

    def pack(self) -> bytes:
        return _LAYOUT.pack(
            MAGIC, self.major, self.minor, self.flags, self.index_offset, self.index_size,
            self.data_offset, self.data_size, self.file_size, self.alignment, self.index_crc32,
        )


def parse_preamble(head: bytes, actual_size: int) -> Preamble:
    """Parse and validate the preamble against the real file size before anything is read.

    The checks run in the order docs/FORMAT.md lists ("Preamble checks"), so a file with
    several faults always raises the same error.
    """
    # 1-2: something to read at all
    if actual_size == 0:
        raise TruncatedFile("file is empty (0 bytes)")
    if len(head) < PREAMBLE_SIZE:
        if head[: len(MAGIC)] == MAGIC[: len(head)]:
            raise TruncatedFile(f"file is {actual_size} bytes, shorter than the 64-byte preamble")
        raise BadMagic("not a weightpack file (too short, no preamble)")
    (magic, major, minor, flags, index_offset, index_size, data_offset, data_size, file_size,
     alignment, index_crc32) = _LAYOUT.unpack_from(head)
    # 3-5: what the file is
    if magic != MAGIC:
        raise BadMagic("not a weightpack file (bad magic bytes)")
    if major != FORMAT_MAJOR:
        raise UnsupportedVersion(
            f"file format {major}.{minor} needs a weightpack that reads format major {major}; "
            f"this one reads format {FORMAT_MAJOR}.x"
        )
    if flags & ~KNOWN_FLAGS:
        raise UnsupportedVersion(
            f"file {major}.{minor} sets preamble flags {flags:#x} this runtime does not know; "
            "it needs a newer weightpack")
    # 6: the file is whole
    if file_size != actual_size:
        if actual_size < file_size:
            raise TruncatedFile(
                f"file is truncated: {actual_size} bytes on disk, preamble declares {file_size}"
            )
        raise LayoutError(f"file has {actual_size - file_size} trailing bytes after its end")
    # 7-13: the sections fit together
    if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
        raise LayoutError(f"invalid alignment {alignment} (a power of two up to {MAX_ALIGNMENT})")
    if index_offset != PREAMBLE_SIZE:
        raise LayoutError(f"index must start right after the preamble, not at {index_offset}")
    if index_size > MAX_INDEX_BYTES:
        raise LimitExceeded(f"index is {index_size} bytes, over the cap {MAX_INDEX_BYTES}")
    if index_size < MIN_INDEX_BYTES:
        raise LayoutError(f"index of {index_size} bytes is too short to be a FlatBuffer")
    if index_offset + index_size > data_offset:
        raise LayoutError("index and data sections overlap")
    if data_offset % alignment:
        raise LayoutError(f"data section at {data_offset} is not aligned to {alignment} bytes")
    if data_offset + data_size != file_size:
        raise LayoutError("data section does not end at the end of the file")
    return Preamble(index_offset, index_size, data_offset, data_size, file_size, alignment,
                    index_crc32, major, minor, flags)
