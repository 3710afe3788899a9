"""Turn the index records and blobs of a packed file back into compressed tensors."""

from __future__ import annotations

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


def shuffle_bytes(data: np.ndarray) -> np.ndarray:
    """Group byte k of every element together: float exponents become long runs zstd likes."""
    item = data.dtype.itemsize
    return np.ascontiguousarray(data.reshape(-1).view(np.uint8).reshape(-1, item).T).reshape(-1)


def unshuffle_bytes(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    item = dtype.itemsize
    return np.ascontiguousarray(data.reshape(item, -1).T).reshape(-1).view(dtype)


def read_stream(packed: PackedFile, stream: StreamRecord, what: str) -> np.ndarray:
    payload = bytes(packed.blob(stream.blob, what))
    coded = coders.CodedStream(
        coder=stream.coder, version=stream.coder_version, payload=payload, bits=stream.bits,
        code_lengths=stream.code_lengths, frequencies=stream.frequencies,
        precision=stream.precision, chunk_offsets=stream.chunk_offsets,
        chunk_size=stream.chunk_size,
    )
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


def decode_tensor(packed: PackedFile, record: TensorRecord) -> CompressedTensor:
    """Rebuild one tensor's compressed form, checking every size against the index first."""
    try:
        return _decode_tensor(packed, record)
    except WeightpackError as exc:
        if str(packed.path) in str(exc):
            raise
        raise type(exc)(f"{packed.path}: {exc}") from None
    except MemoryError:
        raise LimitExceeded(f"{packed.path}: not enough memory to decode tensor {record.name!r} "
                            f"({record.numel:,} elements)") from None


def _decode_tensor(packed: PackedFile, record: TensorRecord) -> CompressedTensor:
    name = printable(record.name)  # for messages
    dtype = torch_dtype(record.dtype)
    if record.scheme == "raw":
        values = record.values
        _require(values is not None, record, "raw tensor without a values stream")
        _require(record.values_dtype == record.dtype
                 or {record.values_dtype, record.dtype} <= FLOAT_NAMES, record,
                 f"values stored as {record.values_dtype} for a {record.dtype} tensor")
        store = numpy_dtype(record.values_dtype)
        _require(values.alphabet_size == 256 and values.count == record.numel * store.itemsize,
                 record, "values stream size does not match the shape")
        data = unshuffle_bytes(read_stream(packed, values, f"{name}/values"), store)
        if store.kind == "b" and data.size and int(data.view(np.uint8).max()) > 1:
            raise CorruptBlob(f"tensor {record.name!r}: bool values other than 0 and 1")
        tensor = numpy_to_tensor(data.reshape(record.shape), record.values_dtype)
        return RawTensor(tensor, dtype)

    indices = record.indices
    _require(indices is not None, record, f"{record.scheme} tensor without indices")
    _require(record.dtype in FLOAT_NAMES, record, "quantized tensor of a non-float dtype")
    if record.scheme == "uniform":
        return _uniform(packed, record, indices, dtype)
    codebook_rec = record.codebook
    _require(codebook_rec is not None, record, "codebook scheme without a codebook")
    _require(codebook_rec.dtype in FLOAT_NAMES, record, "codebook is not a float array")
    if record.scheme == "scalar_codebook":
        _require(codebook_rec.shape == (indices.alphabet_size,), record,
                 "codebook size differs from the index alphabet")
        _require(indices.count == record.numel, record, "index count differs from the shape")
        codebook = numpy_to_tensor(read_array(packed, codebook_rec, f"{name}/codebook"),
                                   codebook_rec.dtype)
        symbols = read_stream(packed, indices, f"{name}/indices")
        idx = torch.from_numpy(symbols.astype(np.int32)).reshape(record.shape)
        return ScalarCodebookTensor(codebook, idx, dtype)
    # vector_codebook
    d = record.subvector_size
    _require(record.layout == 0, record, f"vector layout {record.layout} is unknown")
    _require(d >= 1 and codebook_rec.shape == (indices.alphabet_size, d), record,
             "codebook shape differs from K x d")
    _require(record.numel % d == 0 and indices.count == record.numel // d, record,
             "index count differs from the shape / d")
    codebook = numpy_to_tensor(read_array(packed, codebook_rec, f"{name}/codebook"),
                               codebook_rec.dtype)
    symbols = read_stream(packed, indices, f"{name}/indices")
    idx = torch.from_numpy(symbols.astype(np.int32))
    return VectorCodebookTensor(codebook, idx, record.shape, dtype)


def _uniform(packed: PackedFile, record: TensorRecord, indices: StreamRecord,
             dtype: torch.dtype) -> UniformTensor:
    name = printable(record.name)
    _require(1 <= record.bits <= 16 and indices.alphabet_size == 1 << record.bits, record,
             "bit width and alphabet disagree")
    _require(indices.count == record.numel, record, "code count differs from the shape")
    axis = None if record.axis < 0 else record.axis
    channels = 1 if axis is None else (record.shape[axis] if axis < len(record.shape) else -1)
    _require(channels > 0, record, "quantization axis outside the shape")
    scales_rec = record.scales
    _require(scales_rec is not None and scales_rec.dtype == "float32"
             and scales_rec.shape == (channels,), record, "scales do not match the axis")
    scales = torch.from_numpy(read_array(packed, scales_rec, f"{name}/scales").copy())
    zero_points = None
    if record.zero_points is not None:
        zp = record.zero_points
        _require(zp.dtype == "int32" and zp.shape == (channels,), record,
                 "zero points do not match the axis")
        zero_points = torch.from_numpy(read_array(packed, zp, f"{name}/zero_points").copy())
    symbols = read_stream(packed, indices, f"{name}/indices")
    codes = torch.from_numpy(symbols.astype(np.int32) + np.int32(record.symbol_offset))
    return UniformTensor(codes.reshape(record.shape), scales, zero_points, record.bits, axis,
                         dtype)


def decode_state_dict(packed: PackedFile) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to its original dtype."""
    return {t.name: decode_tensor(packed, t).dequantize() for t in packed.model.tensors}
