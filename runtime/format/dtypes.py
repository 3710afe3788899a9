"""Mapping between the schema's DType enum, names, numpy and torch dtypes."""

from __future__ import annotations

import numpy as np
import torch

from runtime.errors import UnsupportedVersion

# name -> (schema enum value, numpy storage dtype, torch dtype). bfloat16 has no numpy dtype:
# it travels as its raw 16-bit pattern in uint16 and is reinterpreted by torch.
_TABLE: dict[str, tuple[int, np.dtype, torch.dtype]] = {
    "float32": (0, np.dtype("<f4"), torch.float32),
    "float16": (1, np.dtype("<f2"), torch.float16),
    "bfloat16": (2, np.dtype("<u2"), torch.bfloat16),
    "int64": (3, np.dtype("<i8"), torch.int64),
    "int32": (4, np.dtype("<i4"), torch.int32),
    "int8": (5, np.dtype("i1"), torch.int8),
    "uint8": (6, np.dtype("u1"), torch.uint8),
    "bool": (7, np.dtype("?"), torch.bool),
    "float64": (8, np.dtype("<f8"), torch.float64),
    "int16": (9, np.dtype("<i2"), torch.int16),
}
_BY_CODE = {code: name for name, (code, _, _) in _TABLE.items()}
_BY_TORCH = {tdt: name for name, (_, _, tdt) in _TABLE.items()}

FLOAT_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})


def code_of(name: str) -> int:
    return _TABLE[name][0]


def name_of_code(code: int) -> str:
    try:
        return _BY_CODE[code]
    except KeyError:
        raise UnsupportedVersion(
            f"dtype code {code} is unknown to this runtime; the file needs a newer weightpack"
        ) from None


def name_of_torch(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise UnsupportedVersion(f"tensors of dtype {dtype} cannot be packed") from None


def numpy_dtype(name: str) -> np.dtype:
    return _TABLE[name][1]


def torch_dtype(name: str) -> torch.dtype:
    return _TABLE[name][2]


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Contiguous little-endian numpy view of a CPU tensor (bfloat16 as its uint16 bits)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    """Tensor owning a copy of `array` interpreted as dtype `name`."""
    # np.array, not ascontiguousarray, which would turn a 0-d scalar into shape (1,).
    array = np.array(array, dtype=numpy_dtype(name), order="C", copy=True)
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
