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
}
_STREAM_DEFAULTS = {"bits": 0, "code_lengths": None, "frequencies": None, "precision": 0,
                    "chunk_offsets": None, "chunk_size": 0}
# |symbol_offset| and |zero_point| bound: codes stay far inside float32's exact integers.
MAX_CODE_SHIFT = 1 << 16


def _check_fields(record: TensorRecord) -> None:
    """Refuse fields that do not belong to the tensor's scheme or its streams' coders."""
    used = _SCHEME_FIELDS[record.scheme]
    for name, default in _TENSOR_DEFAULTS.items():
        if name not in used and getattr(record, name) != default:
            raise FormatError(f"tensor {record.name!r}: field {name} does not belong to scheme "
                              f"{record.scheme}")
    for role, stream in record.streams():
        used = _CODER_FIELDS[stream.coder]
        for name, default in _STREAM_DEFAULTS.items():
            value = getattr(stream, name)
            if name not in used and (value is not default if default is None else value != default):
                raise FormatError(f"tensor {record.name!r}: {role} field {name} does not belong "
                                  f"to coder {stream.coder}")


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
        data = unshuffle_bytes(read_stream(packed, values, f"{name}/values"), store)
        if record.values_dtype == "bool" and data.size and int(data.view(np.uint8).max()) > 1:
            raise CorruptBlob(f"{name}/values: a bool byte is neither 0 nor 1")
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
    _require(-1 <= record.axis < len(record.shape), record, "quantization axis outside the shape")
    _require(abs(record.symbol_offset) <= MAX_CODE_SHIFT, record,
             f"symbol offset {record.symbol_offset} is outside -2**16..2**16")
    axis = None if record.axis == -1 else record.axis
    channels = 1 if axis is None else record.shape[axis]
    _require(channels > 0, record, "quantization axis has no channels")
    scales_rec = record.scales
    _require(scales_rec is not None and scales_rec.dtype == "float32"
             and scales_rec.shape == (channels,), record, "scales do not match the axis")
    scales = torch.from_numpy(read_array(packed, scales_rec, f"{name}/scales").copy())
    zero_points = None
    if record.zero_points is not None:
        zp = record.zero_points
        _require(zp.dtype == "int32" and zp.shape == (channels,), record,
                 "zero points do not match the axis")
        zp_values = read_array(packed, zp, f"{name}/zero_points")
        _require(int(np.abs(zp_values.astype(np.int64)).max()) <= MAX_CODE_SHIFT, record,
                 "a zero point is outside -2**16..2**16")
        zero_points = torch.from_numpy(zp_values.copy())
    symbols = read_stream(packed, indices, f"{name}/indices")
    codes = torch.from_numpy(symbols.astype(np.int32) + np.int32(record.symbol_offset))
    return UniformTensor(codes.reshape(record.shape), scales, zero_points, record.bits, axis,
                         dtype)


def decode_state_dict(packed: PackedFile) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to its original dtype."""
    return {t.name: decode_tensor(packed, t).dequantize() for t in packed.model.tensors}
