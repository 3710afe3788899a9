"""Read many FlatBuffer tables of one type at once: one numpy column per field.

The generated Python bindings make about six Python calls for every field they read (vtable
lookup, offset arithmetic, type checks, struct unpacking), so a 332-tensor index cost ~27 ms
to parse, more than decoding its weights. Here each field of every table of a type is one
vectorised gather over the index bytes, so a parse costs a few hundred numpy calls whatever
the number of tensors, plus one Python call per string or vector that is kept. No library
reads FlatBuffers column-wise, hence this module; it follows the reference runtime's reads
exactly (flatbuffers/table.py: ``Offset``, ``Indirect``, ``Vector``, ``VectorLen``).

Every position is checked against the buffer before it is read: a malformed offset raises
FormatError, never an IndexError or a read outside the index.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import FormatError

_BYTE_OFFSETS = {n: np.arange(n, dtype=np.int64) for n in (2, 4, 8)}


class FlatBuffer:
    """Little-endian reads at many positions of one buffer at once."""

    def __init__(self, buf: bytes) -> None:
        self.raw = buf
        self.u8 = np.frombuffer(buf, dtype=np.uint8)
        self.size = len(buf)

    def check(self, start: np.ndarray, nbytes: np.ndarray | int, what: str) -> None:
        """Every range [start, start + nbytes) lies inside the buffer."""
        if start.size and (int(start.min()) < 0 or int((start + nbytes).max()) > self.size):
            raise FormatError(f"index is malformed ({what} points outside the {self.size}-byte "
                              "index)")

    def read(self, pos: np.ndarray, dtype: str, what: str) -> np.ndarray:
        """The value of type ``dtype`` (a little-endian numpy type) at each position."""
        dt = np.dtype(dtype)
        if pos.size == 0:
            return np.zeros(0, dt)
        self.check(pos, dt.itemsize, what)
        if dt.itemsize == 1:
            return self.u8[pos].view(dt)
        return self.u8[pos[:, None] + _BYTE_OFFSETS[dt.itemsize]].view(dt).reshape(-1)

    def gather(self, start: np.ndarray, length: np.ndarray, dtype: str) -> np.ndarray:
        """The elements of every vector, concatenated (ranges already checked)."""
        dt = np.dtype(dtype)
        nbytes = length * dt.itemsize
        total = int(nbytes.sum())
        if total == 0:
            return np.zeros(0, dt)
        ends = np.cumsum(nbytes)
        idx = np.arange(total, dtype=np.int64) + np.repeat(start - (ends - nbytes), nbytes)
        return self.u8[idx].view(dt)

    def text(self, start: int, length: int) -> bytes:
        return self.raw[start:start + length]


class Tables:
    """The tables of one type at ``pos`` (int64 positions), read field by field for all."""

    def __init__(self, fb: FlatBuffer, pos: np.ndarray, what: str) -> None:
        self.fb, self.pos, self.what = fb, pos.astype(np.int64), what
        self.vtable = self.pos - fb.read(self.pos, "<i4", what).astype(np.int64)
        self.vtable_size = fb.read(self.vtable, "<u2", f"{what} vtable").astype(np.int64)

    def __len__(self) -> int:
        return int(self.pos.size)

    def _field(self, slot: int) -> np.ndarray:
        """Each table's offset of field ``slot`` (its schema id), 0 where it is absent."""
        at = 4 + 2 * slot
        out = np.zeros(len(self), np.int64)
        listed = at < self.vtable_size
        if listed.any():
            out[listed] = self.fb.read(self.vtable[listed] + at, "<u2", f"{self.what} vtable")
        return out

    def scalar(self, slot: int, dtype: str, default: int | float = 0) -> np.ndarray:
        """Field ``slot`` of every table (``default`` where absent)."""
        off = self._field(slot)
        out = np.full(len(self), default, dtype=np.dtype(dtype).newbyteorder("="))
        has = off != 0
        if has.any():
            out[has] = self.fb.read(self.pos[has] + off[has], dtype, self.what)
        return out

    def refs(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(which tables set reference field ``slot``, the positions it points to)."""
        off = self._field(slot)
        has = off != 0
        at = self.pos[has] + off[has]
        return has, at + self.fb.read(at, "<u4", self.what).astype(np.int64)

    def tables(self, slot: int, what: str) -> tuple[np.ndarray, Tables]:
        """(which tables set sub-table field ``slot``, those sub-tables)."""
        has, target = self.refs(slot)
        return has, Tables(self.fb, target, what)

    def vectors(self, slot: int, itemsize: int, what: str) -> Vectors:
        """Vector (or string, itemsize 1) field ``slot`` of every table."""
        has, at = self.refs(slot)
        length = self.fb.read(at, "<u4", what).astype(np.int64)
        start = at + 4
        self.fb.check(start, length * itemsize, what)
        return Vectors(has, start, length)


class Vectors:
    """Where one vector field of many tables lies: ``has`` per table, then ``start`` and
    ``length`` (in elements) per table that has it."""

    def __init__(self, has: np.ndarray, start: np.ndarray, length: np.ndarray) -> None:
        self.has, self.start, self.length = has, start, length

    def lengths(self) -> np.ndarray:
        """Length per table, 0 where absent."""
        out = np.zeros(self.has.size, np.int64)
        out[self.has] = self.length
        return out
