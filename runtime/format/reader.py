"""Open a packed file: validate preamble, index and data layout, then hand out blob views."""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from pathlib import Path

import numpy as np
import zstandard

from runtime.coders import MAX_ZSTD_EXPANSION
from runtime.errors import (
    ChecksumMismatch,
    FormatError,
    LayoutError,
    LimitExceeded,
    WeightpackError,
)
from runtime.format.features import check_features
from runtime.format.index import parse_index
from runtime.format.preamble import (
    FLAG_INDEX_ZSTD,
    MAX_INDEX_BYTES,
    PREAMBLE_SIZE,
    Preamble,
    parse_preamble,
)
from runtime.format.records import BlobRef, ModelRecord

# A file may declare FREE_ELEMENTS decoded elements (any model up to 64 MiB of float32) plus
# MAX_ELEMENTS_PER_BYTE per byte of file (0.03 bits per element: weights 99.8% pruned and
# entropy-coded cost more), and never more than MAX_TOTAL_ELEMENTS (64 GiB of float32).
FREE_ELEMENTS = 1 << 24
MAX_ELEMENTS_PER_BYTE = 1 << 8
MAX_TOTAL_ELEMENTS = 1 << 34


class PackedFile:
    """A validated, memory-mapped packed file. Use as a context manager.

    Opening checks everything that does not need the payloads decoded: preamble, index
    checksum and structure, and that blobs are aligned, sorted, disjoint, inside the data
    section, and separated only by zero padding. Blob checksums are checked on access.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise WeightpackError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise WeightpackError(f"{self.path}: is a directory, not a packed file") from None
        except OSError as exc:
            raise WeightpackError(f"{self.path}: cannot open ({exc.strerror})") from None
        self._mm: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            head = self._file.read(PREAMBLE_SIZE)
            self.preamble: Preamble = parse_preamble(head, self.size)
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.model: ModelRecord = self._read_index()
            check_declared_size(self.model, self.size)
            self._check_layout()
        except WeightpackError as exc:
            self.close()
            raise type(exc)(f"{self.path}: {exc}") from None

    # -- access -------------------------------------------------------------------------
    def blob(self, ref: BlobRef, what: str = "blob") -> memoryview:
        """Zero-copy view of a blob's bytes, checksum-verified."""
        view = self._data_view(ref)
        if zlib.crc32(view) != ref.crc32:
            raise ChecksumMismatch(f"{self.path}: {what} fails its CRC-32 check (corrupt file)")
        return view

    def verify(self) -> int:
        """Check every blob's checksum; returns the number of blobs checked."""
        blobs = self.model.blobs()
        for what, ref in blobs:
            self.blob(ref, what)
        return len(blobs)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        if self._mm is not None:
            # A caller may still hold a blob view; the map is then freed when that is dropped.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        self._file.close()

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation ---------------------------------------------------------------------
    def _read_index(self) -> ModelRecord:
        p = self.preamble  # parse_preamble has capped index_size
        index = self._mm[p.index_offset : p.index_offset + p.index_size]
        if zlib.crc32(index) != p.index_crc32:
            raise ChecksumMismatch("index fails its CRC-32 check (corrupt file)")
        padding = self._mm[p.index_offset + p.index_size : p.data_offset]
        if padding.count(0) != len(padding):
            raise LayoutError("non-zero bytes in the padding after the index")
        if p.flags & FLAG_INDEX_ZSTD:
            index = _inflate_index(index)
        self.index_raw_size = len(index)
        model = parse_index(index)
        check_features(model, p)
        return model

    def _check_layout(self) -> None:
        """docs/FORMAT.md, "Blobs": the walk over the blobs sorted by (offset, length), done
        as array operations; the first blob that fails names the error, as the walk would."""
        p = self.preamble
        refs = self.model.blob_refs()
        if any(r.offset > p.data_size or r.length > p.data_size for r in refs):
            return self._check_layout_slowly()  # int64 sums could overflow: exact integers
        offset = np.array([r.offset for r in refs], dtype=np.int64)
        length = np.array([r.length for r in refs], dtype=np.int64)
        order = np.lexsort((length, offset))
        offset, length = offset[order], length[order]
        cursor = np.concatenate(([0], (offset + length)[:-1]))  # where the walk stands
        gap = offset - cursor
        checks = [
            (offset % p.alignment != 0, "{} is not aligned to " + f"{p.alignment} bytes"),
            (gap < 0, "{} overlaps the previous blob or is out of order"),
            (gap >= p.alignment, "unreferenced bytes before {}"),
            (offset + length > p.data_size, "{} extends past the end of the data section"),
        ]
        sane = (gap >= 0) & (gap < p.alignment)
        checks.append((self._nonzero_gaps(cursor, np.where(sane, gap, 0)) & sane,
                       "non-zero padding before {}"))
        failed = np.logical_or.reduce([bad for bad, _ in checks]) if refs else np.zeros(0, bool)
        if failed.any():
            first = int(np.argmax(failed))
            labels = [what for what, _ in self.model.blobs()]
            message = next(text for bad, text in checks if bad[first])
            raise LayoutError(message.format(labels[int(order[first])]))
        end = int(offset[-1] + length[-1]) if refs else 0
        if p.data_size - end >= p.alignment:
            raise LayoutError("unreferenced bytes at the end of the data section")
        self._check_zero(end, p.data_size, "the end of the file")

    def _nonzero_gaps(self, start: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Per gap [start, start + size) of the data section: does it hold a non-zero byte?
        (every gap is shorter than the alignment, so this reads at most one per blob)."""
        total = int(size.sum())
        if total == 0:
            return np.zeros(size.shape, dtype=bool)
        ends = np.cumsum(size)
        where = np.arange(total, dtype=np.int64) + np.repeat(start - (ends - size), size)
        data = np.frombuffer(self._mm, dtype=np.uint8, count=self.preamble.data_size,
                             offset=self.preamble.data_offset)
        nonzero = data[where] != 0
        del data  # no view of the map may outlive this call (close() needs none)
        hits = np.flatnonzero(nonzero)
        out = np.zeros(size.shape, dtype=bool)
        out[np.searchsorted(ends, hits, side="right")] = True
        return out

    def _check_layout_slowly(self) -> None:
        """The walk of docs/FORMAT.md, blob by blob with Python integers."""
        p = self.preamble
        cursor = 0
        # (offset, length): a zero-length blob sorts before a blob starting at its offset, so
        # the outcome never depends on the order of the index (docs/FORMAT.md, "Blobs").
        for what, ref in sorted(self.model.blobs(),
                                key=lambda item: (item[1].offset, item[1].length)):
            if ref.offset % p.alignment:
                raise LayoutError(f"{what} is not aligned to {p.alignment} bytes")
            if ref.offset < cursor:
                raise LayoutError(f"{what} overlaps the previous blob or is out of order")
            if ref.offset - cursor >= p.alignment:
                raise LayoutError(f"unreferenced bytes before {what}")
            if ref.offset + ref.length > p.data_size:
                raise LayoutError(f"{what} extends past the end of the data section")
            self._check_zero(cursor, ref.offset, what)
            cursor = ref.offset + ref.length
        if p.data_size - cursor >= p.alignment:
            raise LayoutError("unreferenced bytes at the end of the data section")
        self._check_zero(cursor, p.data_size, "the end of the file")

    def _check_zero(self, start: int, stop: int, what: str) -> None:
        base = self.preamble.data_offset
        gap = self._mm[base + start : base + stop]
        if gap.count(0) != len(gap):
            raise LayoutError(f"non-zero padding before {what}")

    def _data_view(self, ref: BlobRef) -> memoryview:
        if self._mm is None:
            raise WeightpackError(f"{self.path}: file is closed")
        if ref.offset + ref.length > self.preamble.data_size:
            raise LayoutError("blob reference outside the data section")
        start = self.preamble.data_offset + ref.offset
        return memoryview(self._mm)[start : start + ref.length]


def _inflate_index(frame: bytes) -> bytes:
    """One zstd frame, exactly: its declared size is checked before anything is allocated,
    and bytes after it inside index_size (even zeros) are refused, so the index section can
    hide nothing the layout rules would otherwise catch."""
    try:
        size = zstandard.frame_content_size(frame)
        if size < 0 or size > MAX_INDEX_BYTES:
            raise LimitExceeded(f"compressed index declares {size} bytes, over the cap")
        if size > MAX_ZSTD_EXPANSION * len(frame):
            raise FormatError(f"compressed index of {len(frame)} bytes declares {size}, more "
                              "than a zstd frame can hold")
        index = zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=MAX_INDEX_BYTES, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"compressed index does not decompress ({exc})") from None
    except MemoryError:
        raise LimitExceeded(f"not enough memory to inflate a {size}-byte index") from None
    if len(index) != size:
        raise FormatError("compressed index decompresses to the wrong size")
    return index


def check_declared_size(model: ModelRecord, file_size: int) -> int:
    """The decoded elements the file declares, checked against a bound on the whole model.

    Per-tensor caps alone let a 440-byte file declare a model of 2^40 elements (one present
    symbol codes any count in zero bytes). Beyond FREE_ELEMENTS, a real model costs more than
    1 / MAX_ELEMENTS_PER_BYTE bytes per element (the best real codings spend 0.1 bits or more
    per weight), so the memory and time spent decoding stay within a constant times the file
    size. O(tensors), no pass over data.
    """
    total = sum(t.numel for t in model.tensors)
    allowed = min(MAX_TOTAL_ELEMENTS, FREE_ELEMENTS + MAX_ELEMENTS_PER_BYTE * file_size)
    if total > allowed:
        raise LimitExceeded(f"the tensors declare {total:,} elements in total, over the "
                            f"{allowed:,} a {file_size:,}-byte file may declare")
    return total


def open_packed(path: str | os.PathLike) -> PackedFile:
    return PackedFile(path)
