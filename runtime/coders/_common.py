"""Shared pieces of the coders: the stream record, alphabet helpers and input validation.

Everything a decoder looks at comes from a file and is therefore untrusted; the helpers here turn
any inconsistency into :class:`~runtime.errors.CorruptBlob` or
:class:`~runtime.errors.LimitExceeded` so that no numpy error ever escapes a decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from runtime.errors import CorruptBlob, LimitExceeded, UnsupportedVersion

CODERS: tuple[str, ...] = ("raw", "zstd", "huffman", "ans", "runs")
"""Coder names; a name's position is its code in the file index (the schema's `Coder` enum,
checked by the tests) and the order breaks size ties in ``encode_best``."""

FORMAT_VERSION = 1
"""The only coder format version this code reads and writes (the same for every coder)."""

MAX_ALPHABET = 1 << 16
"""Largest alphabet: codebook indices and raw bytes both fit in 16 bits."""

MAX_COUNT = 1 << 32
"""Largest symbol count a decoder accepts, so a corrupt index cannot force a huge allocation."""


@dataclass(frozen=True, eq=False)
class CoderParams:
    """How a stream is coded: the coder, its version and the tables its decoder needs.

    The one record of these fields. A stream in memory (:class:`CodedStream`) adds its payload;
    the file index's entry (:class:`runtime.format.records.StreamRecord`) adds where the payload
    lies and how many symbols it holds. :meth:`coder_params` moves the fields between the two.
    """

    coder: str
    version: int
    bits: int = 0
    code_lengths: np.ndarray | None = None
    frequencies: np.ndarray | None = None
    precision: int = 0
    chunk_offsets: np.ndarray | None = None
    chunk_size: int = 0

    def coder_params(self) -> dict[str, Any]:
        """The coder fields by name, for building the other kind of record from this one."""
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def params_nbytes(self) -> int:
        """Bytes the parameter tables take when stored (scalar fields are not counted)."""
        arrays = (self.code_lengths, self.frequencies, self.chunk_offsets)
        return sum(int(np.asarray(a).nbytes) for a in arrays if a is not None)

    def __eq__(self, other: object) -> bool:
        # Field-wise, with arrays compared by dtype and value (the default tuple compare of
        # numpy arrays raises instead of answering).
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (
                    isinstance(a, np.ndarray)
                    and isinstance(b, np.ndarray)
                    and a.dtype == b.dtype
                    and np.array_equal(a, b)
                ):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable numpy fields: not hashable


_PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(CoderParams))
"""CoderParams' field names, computed once: ``coder_params`` runs for every stream loaded."""


@dataclass(frozen=True, eq=False)
class CodedStream(CoderParams):
    """One coded symbol stream: the coder fields the file index stores, and the payload.

    Decoders rely only on these fields plus the ``count`` and ``alphabet_size`` the caller knows,
    so a stream rebuilt from a file decodes exactly like the one the encoder returned.
    """

    payload: bytes = field(kw_only=True)

    @property
    def nbytes(self) -> int:
        """Payload plus parameter tables: the honest stored cost used to compare coders."""
        return len(self.payload) + self.params_nbytes()


def check_alphabet(alphabet_size: int) -> int:
    """Validate an alphabet size; out-of-range sizes are a limit, not a bug in the file."""
    k = int(alphabet_size)
    if k != alphabet_size or not 1 <= k <= MAX_ALPHABET:
        raise LimitExceeded(f"alphabet size {alphabet_size!r} is outside 1..{MAX_ALPHABET}")
    return k


def min_bits(alphabet_size: int) -> int:
    """Bits needed to write any symbol below ``alphabet_size``: ceil(log2 K).

    ``K == 1`` gives 0: a one-letter alphabet carries no information, so ``raw`` stores nothing.
    """
    k = check_alphabet(alphabet_size)
    return (k - 1).bit_length()


def symbol_dtype(alphabet_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ``alphabet_size - 1`` (what ``decode`` returns)."""
    k = check_alphabet(alphabet_size)
    return np.dtype(np.uint8) if k <= 256 else np.dtype(np.uint16)


def prepare_symbols(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """Flatten encoder input to a C-order 1-D array of ``symbol_dtype`` after a range check.

    Bad encoder input is a caller bug, hence ``ValueError``/``TypeError`` rather than a file error.
    """
    k = check_alphabet(alphabet_size)
    arr = np.asarray(symbols)
    if arr.dtype.kind not in "iub":
        raise TypeError(f"symbols must be an integer array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"symbols span {lo}..{hi}, outside the alphabet 0..{k - 1}")
    if flat.size > MAX_COUNT:
        raise LimitExceeded(f"{flat.size} symbols exceed the limit of {MAX_COUNT}")
    return np.ascontiguousarray(flat, dtype=symbol_dtype(k))


def check_count(count: int) -> int:
    """Validate the caller-declared symbol count before anything is allocated from it."""
    try:
        n = int(count)
    except (TypeError, ValueError) as exc:
        raise CorruptBlob(f"symbol count {count!r} is not an integer") from exc
    if n != count or n < 0:
        raise CorruptBlob(f"symbol count {count!r} is not a non-negative integer")
    if n > MAX_COUNT:
        raise LimitExceeded(f"symbol count {n} exceeds the limit of {MAX_COUNT}")
    return n


def check_version(coder: str, version: int) -> None:
    """Reject coders and versions this build cannot read, naming them."""
    if coder not in CODERS:
        raise UnsupportedVersion(f"unknown coder {coder!r} (this build knows {', '.join(CODERS)})")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"coder {coder!r} version {version!r} is not supported (this build reads version "
            f"{FORMAT_VERSION})"
        )


def int_table(values: object, name: str, length: int, max_value: int) -> np.ndarray:
    """Return a stored parameter table as int64 after checking shape, dtype kind and range."""
    if values is None:
        raise CorruptBlob(f"{name} table is missing")
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CorruptBlob(f"{name} table must be a 1-D integer array, got {arr.dtype}{arr.shape}")
    if arr.shape[0] != length:
        raise CorruptBlob(f"{name} table has {arr.shape[0]} entries, expected {length}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > max_value):
        raise CorruptBlob(f"{name} table values must lie in 0..{max_value}")
    return arr.astype(np.int64)


def entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Empirical order-0 entropy in bits per symbol: the yardstick for every coder's size."""
    flat = prepare_symbols(symbols, alphabet_size)
    if flat.size == 0:
        return 0.0
    counts = np.bincount(flat, minlength=int(alphabet_size))
    return entropy_of_counts(counts)


def entropy_of_counts(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram (0.0 for an empty one)."""
    c = counts[counts > 0].astype(np.float64)
    total = c.sum()
    if total == 0:
        return 0.0
    p = c / total
    return float(max(0.0, -(p * np.log2(p)).sum()))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` symbols occupy bit-packed at ``bits`` bits each."""
    return math.ceil(count * bits / 8)
