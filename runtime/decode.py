"""Turn the index records and blobs of a packed file back into compressed or dense tensors.

Two consumers: ``decode_tensor`` rebuilds one tensor's compressed form (codebook and indices,
codes and scales: what int8 export and reports need), and ``decode_state_dict`` decodes every
tensor straight to its dense values, which is what loading needs and where the time goes. The
latter writes all dense tensors into one block of memory (huge pages where Linux offers them:
a fresh page costs more to fault in than its values cost to decode) and decodes the large
tensors on a thread pool, since zstd, numpy and torch release the GIL while they work. Both
apply the same field rules first and compute the arithmetic docs/FORMAT.md specifies, so they
agree bit for bit (tests/test_format_spec.py, tests/test_golden.py).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from runtime import coders
from runtime.errors import (
    CorruptBlob,
    FormatError,
    LimitExceeded,
    WeightpackError,
    printable,
)
from runtime.format.dtypes import FLOAT_NAMES, numpy_dtype, numpy_to_tensor, torch_dtype
from runtime.format.reader import PackedFile
from runtime.format.records import ArrayRecord, StreamRecord, TensorRecord
from runtime.tensors import (
    CompressedTensor,
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

PARALLEL_ELEMENTS = 1 << 16
"""Tensors from this size up are decoded on the thread pool; smaller ones cost more to hand
over than to decode (a ResNet's BatchNorm vectors, its first convolution)."""

SMALL_GATHER = 1 << 13
"""Codebook lookups below this many indices run in numpy, from it on in torch."""

DEQUANT_BLOCK = 1 << 16
"""Elements dequantized at a time by large uniform tensors (per-tensor or leading-axis)."""

GATHER_BLOCK = 1 << 16
"""Indices widened and gathered at a time by large codebook lookups (256 KiB of int32)."""

ARENA_ALIGNMENT = 64
HUGE_PAGE_BYTES = 2 << 20


def shuffle_bytes(data: np.ndarray) -> np.ndarray:
    """Group byte k of every element together: float exponents become long runs zstd likes."""
    item = data.dtype.itemsize
    return np.ascontiguousarray(data.reshape(-1).view(np.uint8).reshape(-1, item).T).reshape(-1)


def unshuffle_bytes(data: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Inverse of :func:`shuffle_bytes`, into ``out`` (a uint8 array of the size) if given."""
    item = dtype.itemsize
    planes = data.reshape(item, -1).T
    if out is None:
        return np.ascontiguousarray(planes).reshape(-1).view(dtype)
    out.reshape(-1, item)[...] = planes
    return out.view(dtype)


def read_stream(packed: PackedFile, stream: StreamRecord, what: str) -> np.ndarray:
    # The coders read the memory-mapped blob in place: nothing is copied before decoding.
    payload = packed.blob(stream.blob, what)
    coded = coders.CodedStream(**stream.coder_params(), payload=payload)
    symbols = coders.decode(coded, stream.count, stream.alphabet_size)
    if symbols.shape != (stream.count,):
        raise CorruptBlob(f"{what} decoded to {symbols.size} symbols, expected {stream.count}")
    return symbols


def read_array(packed: PackedFile, array: ArrayRecord, what: str) -> np.ndarray:
    dtype = numpy_dtype(array.dtype)
    count = int(np.prod(array.shape, dtype=object)) if array.shape else 1
    if array.blob.length != count * dtype.itemsize:
        raise FormatError(f"{what}: blob is {array.blob.length} bytes, shape needs "
                          f"{count * dtype.itemsize}")
    view = packed.blob(array.blob, what)
    return np.frombuffer(view, dtype=dtype, count=count).reshape(array.shape)


def _require(cond: bool, record: TensorRecord, problem: str) -> None:
    if not cond:
        raise FormatError(f"tensor {record.name!r}: {problem}")


# The fields each scheme reads (docs/FORMAT.md, "Tensor"); every other field must be absent or
# hold its schema default, so no file means something to one reader and nothing to another.
_SCHEME_FIELDS: dict[str, frozenset[str]] = {
    "raw": frozenset({"values", "values_dtype"}),
    "uniform": frozenset({"indices", "bits", "symbol_offset", "scales", "zero_points", "axis"}),
    "scalar_codebook": frozenset({"indices", "codebook"}),
    "vector_codebook": frozenset({"indices", "codebook", "subvector_size", "layout"}),
}
_TENSOR_DEFAULTS = {"values": None, "values_dtype": "float32", "bits": 0, "symbol_offset": 0,
                    "scales": None, "zero_points": None, "axis": -1, "codebook": None,
                    "indices": None, "subvector_size": 0, "layout": 0}
_CODER_FIELDS: dict[str, frozenset[str]] = {
    "raw": frozenset({"bits"}),
    "zstd": frozenset({"bits"}),
    "huffman": frozenset({"code_lengths", "chunk_offsets", "chunk_size"}),
    "ans": frozenset({"frequencies", "precision"}),
    "runs": frozenset(),  # everything is in the payload (docs/CODERS.md)
}
_STREAM_DEFAULTS = {"bits": 0, "code_lengths": None, "frequencies": None, "precision": 0,
                    "chunk_offsets": None, "chunk_size": 0}
# |symbol_offset| and |zero_point| bound: codes stay far inside float32's exact integers.
MAX_CODE_SHIFT = 1 << 16


# The fields each scheme / coder must leave at their defaults, worked out once (this check runs
# for every tensor of every load).
_UNUSED_TENSOR_FIELDS = {scheme: tuple((n, d) for n, d in _TENSOR_DEFAULTS.items() if n not in used)
                         for scheme, used in _SCHEME_FIELDS.items()}
_UNUSED_STREAM_FIELDS = {coder: tuple((n, d) for n, d in _STREAM_DEFAULTS.items() if n not in used)
                         for coder, used in _CODER_FIELDS.items()}


def _check_fields(record: TensorRecord) -> None:
    """Refuse fields that do not belong to the tensor's scheme or its streams' coders."""
    for name, default in _UNUSED_TENSOR_FIELDS[record.scheme]:
        if getattr(record, name) != default:
            raise FormatError(f"tensor {record.name!r}: field {name} does not belong to scheme "
                              f"{record.scheme}")
    for role, stream in (("values", record.values), ("indices", record.indices)):
        if stream is None:
            continue
        for name, default in _UNUSED_STREAM_FIELDS[stream.coder]:
            value = getattr(stream, name)
            if value is not default if default is None else value != default:
                raise FormatError(f"tensor {record.name!r}: {role} field {name} does not belong "
                                  f"to coder {stream.coder}")


def check_record(record: TensorRecord) -> None:
    """Every rule on a tensor's index fields (docs/FORMAT.md, "Tensor"), before any blob of it
    is read: the first part of decoding it."""
    _check_fields(record)
    if record.scheme == "raw":
        values = record.values
        _require(values is not None, record, "raw tensor without a values stream")
        _require(record.values_dtype == record.dtype
                 or {record.values_dtype, record.dtype} <= FLOAT_NAMES, record,
                 f"values stored as {record.values_dtype} cannot be restored to {record.dtype}")
        store = numpy_dtype(record.values_dtype)
        _require(values.alphabet_size == 256 and values.count == record.numel * store.itemsize,
                 record, "values stream size does not match the shape")
        return
    indices = record.indices
    _require(indices is not None, record, f"{record.scheme} tensor without indices")
    _require(record.dtype in FLOAT_NAMES, record, "quantized tensor of a non-float dtype")
    if record.scheme == "uniform":
        _require(1 <= record.bits <= 16 and indices.alphabet_size == 1 << record.bits, record,
                 "bit width and alphabet disagree")
        _require(indices.count == record.numel, record, "code count differs from the shape")
        _require(-1 <= record.axis < len(record.shape), record,
                 "quantization axis outside the shape")
        _require(abs(record.symbol_offset) <= MAX_CODE_SHIFT, record,
                 f"symbol offset {record.symbol_offset} is outside -2**16..2**16")
        _require(_channels(record) > 0, record, "quantization axis has no channels")
        scales = record.scales
        # Float16 scales only behind the half_scales feature (runtime/format/features.py).
        _require(scales is not None and scales.dtype in ("float32", "float16")
                 and scales.shape == (_channels(record),), record, "scales do not match the axis")
        zp = record.zero_points
        _require(zp is None or (zp.dtype == "int32" and zp.shape == (_channels(record),)),
                 record, "zero points do not match the axis")
        return
    codebook = record.codebook
    _require(codebook is not None, record, "codebook scheme without a codebook")
    _require(codebook.dtype in FLOAT_NAMES, record, "codebook is not a float array")
    if record.scheme == "scalar_codebook":
        _require(codebook.shape == (indices.alphabet_size,), record,
                 "codebook size differs from the index alphabet")
        _require(indices.count == record.numel, record, "index count differs from the shape")
        return
    d = record.subvector_size
    _require(record.layout == 0, record, f"vector layout {record.layout} is unknown")
    _require(d >= 1 and codebook.shape == (indices.alphabet_size, d), record,
             "codebook shape differs from K x d")
    _require(record.numel % d == 0 and indices.count == record.numel // d, record,
             "index count differs from the shape / d")


def _channels(record: TensorRecord) -> int:
    return 1 if record.axis == -1 else record.shape[record.axis]


@dataclass
class _Parts:
    """A tensor's blobs, read and decoded but not yet combined: ``symbols`` (indices or
    codes, or the raw values restored to their stored dtype), and the arrays."""

    symbols: np.ndarray
    codebook: np.ndarray | None = None
    scales: np.ndarray | None = None
    zero_points: np.ndarray | None = None


def _read_parts(packed: PackedFile, record: TensorRecord, raw_out: np.ndarray | None = None
                ) -> _Parts:
    """The tensor's arrays, then its stream (docs/FORMAT.md, check 19: each blob's CRC-32 as
    it is read, then its coder); `check_record` has passed. Raw values are restored into
    `raw_out` (uint8, their size) when given."""
    name = printable(record.name)  # for messages
    if record.scheme == "raw":
        store = numpy_dtype(record.values_dtype)
        data = unshuffle_bytes(read_stream(packed, record.values, f"{name}/values"), store,
                               raw_out)
        if record.values_dtype == "bool" and data.size and int(data.view(np.uint8).max()) > 1:
            raise CorruptBlob(f"{name}/values: a bool byte is neither 0 nor 1")
        return _Parts(data)
    parts = _Parts(np.empty(0))
    if record.scheme == "uniform":
        # Float16 scales widen exactly: the decoded tensor is float32 from here on.
        parts.scales = read_array(packed, record.scales, f"{name}/scales").astype(
            np.float32, copy=False)
        if record.zero_points is not None:
            zp = read_array(packed, record.zero_points, f"{name}/zero_points")
            _require(int(np.abs(zp.astype(np.int64)).max()) <= MAX_CODE_SHIFT, record,
                     "a zero point is outside -2**16..2**16")
            parts.zero_points = zp
    else:
        parts.codebook = read_array(packed, record.codebook, f"{name}/codebook")
    parts.symbols = read_stream(packed, record.indices, f"{name}/indices")
    return parts


@contextlib.contextmanager
def _file_errors(packed: PackedFile, record: TensorRecord) -> Iterator[None]:
    """Errors name the file; running out of memory is a limit of the file, not a crash."""
    try:
        yield
    except WeightpackError as exc:
        if str(packed.path) in str(exc):
            raise
        raise type(exc)(f"{packed.path}: {exc}") from None
    except MemoryError:
        raise LimitExceeded(f"{packed.path}: not enough memory to decode tensor {record.name!r} "
                            f"({record.numel:,} elements)") from None


def decode_tensor(packed: PackedFile, record: TensorRecord) -> CompressedTensor:
    """Rebuild one tensor's compressed form, checking every size against the index first."""
    with _file_errors(packed, record):
        check_record(record)
        return _compressed(record, _read_parts(packed, record))


def _compressed(record: TensorRecord, parts: _Parts) -> CompressedTensor:
    dtype = torch_dtype(record.dtype)
    if record.scheme == "raw":
        return RawTensor(numpy_to_tensor(parts.symbols.reshape(record.shape),
                                         record.values_dtype), dtype)
    if record.scheme == "uniform":
        axis = None if record.axis == -1 else record.axis
        zero_points = None if parts.zero_points is None else torch.from_numpy(
            parts.zero_points.copy())
        codes = torch.from_numpy(parts.symbols.astype(np.int32) + np.int32(record.symbol_offset))
        return UniformTensor(codes.reshape(record.shape), torch.from_numpy(parts.scales.copy()),
                             zero_points, record.bits, axis, dtype)
    codebook = numpy_to_tensor(parts.codebook, record.codebook.dtype)
    idx = torch.from_numpy(parts.symbols.astype(np.int32))
    if record.scheme == "scalar_codebook":
        return ScalarCodebookTensor(codebook, idx.reshape(record.shape), dtype)
    return VectorCodebookTensor(codebook, idx, record.shape, dtype)


# --- dense decoding ------------------------------------------------------------------------


def _fast_path(record: TensorRecord) -> bool:
    """Whether `_dense_into` computes this tensor in place: every float32 result and raw values
    kept at their own dtype (anything needing a float conversion takes `dequantize()`)."""
    if record.scheme == "raw":
        return record.values_dtype == record.dtype and record.dtype != "bool"
    return record.dtype == "float32"


def _dense_into(record: TensorRecord, parts: _Parts, out: np.ndarray) -> None:
    """Write the tensor's values into `out` (1-D numpy view of its dtype, numel elements), with
    the arithmetic of `dequantize()` (docs/FORMAT.md) done in place."""
    if record.scheme == "raw":
        return  # restored in place by _read_parts
    symbols = parts.symbols
    if record.scheme != "uniform":
        # codebook entries to float32 (exact from 16-bit floats, rounded from float64)
        table = parts.codebook.astype(np.float32)
        if record.scheme == "vector_codebook":
            out = out.reshape(-1, record.subvector_size)
        if symbols.size < SMALL_GATHER:  # numpy's call costs less on small tensors
            # "clip" writes straight into out ("raise" buffers it); the coder has checked
            # every symbol against the alphabet, which is the codebook's length.
            np.take(table, symbols, axis=0, out=out, mode="clip")
        else:  # torch's gather runs up to 2.5x numpy's on large ones
            _gather_in_blocks(torch.from_numpy(table), symbols, torch.from_numpy(out))
        return
    # code = symbol + offset - zero_point: exact integers below 2**18, so exact in float32,
    # then one float32 product with the channel's scale. numpy, not torch: torch splits these
    # element-wise ops over its intra-op threads, and on a busy machine every small one then
    # waits for a descheduled thread (2 ms for a 36,864-element multiply instead of 20 us).
    shift = np.float32(record.symbol_offset)
    add = None if parts.zero_points is None else shift - parts.zero_points.astype(np.float32)
    if add is None and shift:
        add = shift
    scales = parts.scales.astype(np.float32)
    if record.axis in (-1, 0) and out.size >= 2 * DEQUANT_BLOCK:
        # Rows of the leading axis (or plain slices), a cache-sized block at a time: the
        # three passes then read and write the block in cache instead of memory three times.
        if record.axis == -1:  # one offset and scale: plain slices
            values, codes = out.reshape(-1, 1), symbols.reshape(-1, 1)
            row_add = None if add is None else np.float32(np.reshape(add, -1)[0])
            row_scale = scales[0]
        else:  # a row per channel
            values, codes = out.reshape(record.shape[0], -1), symbols.reshape(record.shape[0], -1)
            row_add = None if add is None else np.broadcast_to(add, scales.shape)[:, None]
            row_scale = scales[:, None]
        step = max(1, DEQUANT_BLOCK // values.shape[1])
        for start in range(0, values.shape[0], step):
            part = slice(start, start + step)
            block = values[part]
            np.copyto(block, codes[part], casting="unsafe")
            if row_add is not None:
                np.add(block, row_add if record.axis == -1 else row_add[part], out=block)
            np.multiply(block, row_scale if record.axis == -1 else row_scale[part], out=block)
        return
    values = out.reshape(record.shape)
    values[...] = symbols.reshape(record.shape)
    view = [1] * len(record.shape)
    if record.axis != -1:
        view[record.axis] = -1
    if add is not None:
        np.add(values, add if np.ndim(add) == 0 else add.reshape(view), out=values)
    np.multiply(values, scales.reshape(view), out=values)


def _gather_in_blocks(table: torch.Tensor, symbols: np.ndarray, out: torch.Tensor) -> None:
    """out[i] = table[symbols[i]], a block of GATHER_BLOCK indices at a time: index_select
    wants int32 indices, and widening them all at once wrote (and page-faulted) a temporary
    four times the symbols' size; one cache-sized buffer reused costs nothing of the kind."""
    n = symbols.shape[0]
    index = np.empty(min(n, GATHER_BLOCK), dtype=np.int32)
    index_t = torch.from_numpy(index)
    for start in range(0, n, GATHER_BLOCK):
        stop = min(n, start + GATHER_BLOCK)
        np.copyto(index[:stop - start], symbols[start:stop], casting="unsafe")
        torch.index_select(table, 0, index_t[:stop - start], out=out[start:stop])


def _arena(nbytes: int) -> torch.Tensor:
    """Zeroed uint8 memory for every dense tensor of a file. From 2 MiB up it is anonymous
    memory advised to use huge pages: faulting in 4 KiB pages one by one took longer than
    decoding into them (100 MB: ~45 ms -> ~18 ms on Linux with transparent huge pages on
    madvise). The tensors made from it keep it alive."""
    if nbytes >= HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):  # advice only
            memory.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(memory, dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8)


def decode_state_dict(packed: PackedFile, threads: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to its original dtype.

    The large tensors are decoded on ``threads`` threads (default: torch's intra-op thread
    count), the others on this one.
    The tensors that can be are views into one shared block of memory per dtype (as with
    ``torch.load(mmap=True)``; ``torch.save`` of one of them alone saves the whole block).
    Errors are those of decoding the tensors one by one in index order.
    """
    records = packed.model.tensors
    # One block per dtype: torch.save refuses tensors that view one storage as different
    # dtypes (a float32 weight and an int64 BatchNorm counter), so a user's
    # `torch.save(runtime.load(f).state_dict())` needs each block to hold one dtype.
    offsets: dict[str, tuple[torch.dtype, int]] = {}
    sizes: dict[torch.dtype, int] = {}
    for record in records:
        if _fast_path(record):
            dtype = torch_dtype(record.dtype)
            offsets[record.name] = (dtype, sizes.get(dtype, 0))
            sizes[dtype] = sizes.get(dtype, 0) + -(-record.numel * dtype.itemsize
                                                   // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    try:
        arenas = {dtype: _arena(size) for dtype, size in sizes.items()}
    except (MemoryError, OSError):
        raise LimitExceeded(f"{packed.path}: not enough memory for the "
                            f"{sum(sizes.values()):,} bytes of its tensors") from None
    # Decoding works on numpy views of the blocks (a numpy slice costs far less than a torch
    # one); each result is then one as_strided view of its dtype's block.
    arena_bytes = {dtype: arena.numpy() for dtype, arena in arenas.items()}
    typed = {dtype: arena.view(dtype) for dtype, arena in arenas.items()}

    def decode(record: TensorRecord) -> torch.Tensor:
        with _file_errors(packed, record):
            check_record(record)
            place = offsets.get(record.name)
            if place is None:
                return _compressed(record, _read_parts(packed, record)).dequantize()
            dtype, start = place
            store = numpy_dtype(record.dtype)
            block = arena_bytes[dtype][start:start + record.numel * store.itemsize]
            parts = _read_parts(packed, record, block if record.scheme == "raw" else None)
            _dense_into(record, parts, block.view(store))
            return typed[dtype].as_strided(record.shape, _contiguous_strides(record.shape),
                                           start // store.itemsize)

    workers = max(1, threads if threads is not None else torch.get_num_threads())
    large = [r for r in records if r.numel >= PARALLEL_ELEMENTS] if workers > 1 else []
    results: dict[str, Future | torch.Tensor] = {}
    if large:
        with ThreadPoolExecutor(min(workers, len(large))) as pool:
            for record in sorted(large, key=lambda r: -_decode_cost(r)):  # longest first
                results[record.name] = pool.submit(decode, record)
            _decode_rest(records, results, decode)
    else:
        _decode_rest(records, results, decode)
    # In index order, so the error raised is the one a decode one by one would raise.
    return {r.name: _result(results[r.name]) for r in records}


SLOW_CODER_COST = 10
"""A slow coder's symbol costs about this many fast ones to decode (docs/CODERS.md), and holds
the GIL meanwhile: such a tensor starts first, so the others' GIL-free work overlaps it."""


def _decode_cost(record: TensorRecord) -> int:
    slow = any(s.coder not in coders.FAST_CODERS for _, s in record.streams())
    return record.numel * (SLOW_CODER_COST if slow else 1)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _decode_rest(records: tuple[TensorRecord, ...], results: dict, decode) -> None:
    """The tensors not on the pool, on this thread; an error is kept for its turn."""
    for record in records:
        if record.name not in results:
            try:
                results[record.name] = decode(record)
            except WeightpackError as exc:
                results[record.name] = exc


def _result(value: Future | torch.Tensor | WeightpackError) -> torch.Tensor:
    if isinstance(value, Future):
        value = value.result()
    if isinstance(value, WeightpackError):
        raise value
    return value
