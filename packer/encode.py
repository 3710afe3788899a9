"""Compressed tensors -> index records + data-section blobs, entropy-coding every stream."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from packer.config import CODER_CHOICES
from runtime import coders
from runtime.decode import shuffle_bytes
from runtime.errors import ConfigError
from runtime.format.dtypes import name_of_torch, numpy_dtype, tensor_to_numpy
from runtime.format.records import ArrayRecord, BlobRef, StreamRecord, TensorRecord
from runtime.tensors import (
    CompressedTensor,
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)


class DataSection:
    """Accumulates blobs at aligned offsets, zero-padded, in the order they are added."""

    def __init__(self, alignment: int):
        self.alignment = alignment
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, payload: bytes) -> BlobRef:
        pad = -self.size % self.alignment
        if pad:
            self.parts.append(bytes(pad))
        offset = self.size + pad
        self.parts.append(payload)
        self.size = offset + len(payload)
        return BlobRef(offset, len(payload), zlib.crc32(payload))


@dataclass
class StreamReport:
    """What coding one stream cost, for the per-tensor table and the coder benchmark."""

    role: str
    count: int
    alphabet_size: int
    coder: str
    coded_bytes: int  # payload + canonical coder parameters
    entropy_bits: float
    tried: dict[str, int] = field(default_factory=dict)


@dataclass
class EncodedTensor:
    record: TensorRecord
    streams: list[StreamReport]


class Encoder:
    def __init__(self, data: DataSection, coder: str = "auto"):
        if coder not in CODER_CHOICES:
            raise ConfigError(f"unknown coder {coder!r}; choose from {', '.join(CODER_CHOICES)}")
        self.data = data
        self.coder = coder

    def stream(self, symbols: np.ndarray, alphabet: int, role: str,
               reports: list[StreamReport], coder: str) -> StreamRecord:
        symbols = np.ascontiguousarray(symbols.reshape(-1))
        if coder == "auto":
            coded, tried = coders.encode_best(symbols, alphabet)
        else:
            coded, tried = coders.encode(symbols, alphabet, coder), {}
        entropy = coders.entropy_bits(symbols, alphabet)
        reports.append(StreamReport(role, symbols.size, alphabet, coded.coder, coded.nbytes,
                                    entropy, dict(tried)))
        return StreamRecord(**coded.coder_params(), blob=self.data.add(coded.payload),
                            alphabet_size=alphabet, count=int(symbols.size),
                            entropy_bits=entropy)

    def array(self, tensor: torch.Tensor) -> ArrayRecord:
        dtype = name_of_torch(tensor.dtype)
        data = tensor_to_numpy(tensor).astype(numpy_dtype(dtype), copy=False)
        return ArrayRecord(self.data.add(data.tobytes()), dtype, tuple(tensor.shape))

    def tensor(self, name: str, tensor: CompressedTensor,
               coder: str | None = None) -> EncodedTensor:
        """Encode one tensor; `coder` overrides the encoder's default for its streams."""
        coder = coder or self.coder
        if coder not in CODER_CHOICES:
            raise ConfigError(f"{name}: unknown coder {coder!r}; choose from "
                              f"{', '.join(CODER_CHOICES)}")
        reports: list[StreamReport] = []
        common = {"name": name, "shape": tuple(int(d) for d in tensor.shape),
                  "dtype": name_of_torch(tensor.dtype)}
        match tensor:
            case RawTensor(values=values):
                raw = tensor_to_numpy(values)
                stream = self.stream(shuffle_bytes(raw), 256, "values", reports, coder)
                record = TensorRecord(scheme="raw", values=stream,
                                      values_dtype=name_of_torch(values.dtype), **common)
            case UniformTensor():
                low, _ = tensor.code_range
                symbols = (tensor.codes.to(torch.int64) - low).numpy()
                scales = self.array(tensor.scales.to(torch.float32).reshape(-1))
                zps = (None if tensor.zero_points is None
                       else self.array(tensor.zero_points.to(torch.int32).reshape(-1)))
                stream = self.stream(symbols, 1 << tensor.bits, "indices", reports, coder)
                record = TensorRecord(
                    scheme="uniform", bits=tensor.bits, symbol_offset=low, scales=scales,
                    zero_points=zps, axis=-1 if tensor.axis is None else tensor.axis,
                    indices=stream, **common)
            case ScalarCodebookTensor(codebook=codebook, indices=indices):
                book = self.array(codebook)
                stream = self.stream(indices.numpy(), int(codebook.shape[0]), "indices",
                                     reports, coder)
                record = TensorRecord(scheme="scalar_codebook", codebook=book, indices=stream,
                                      **common)
            case VectorCodebookTensor(codebook=codebook, indices=indices):
                book = self.array(codebook)
                stream = self.stream(indices.numpy(), int(codebook.shape[0]), "indices",
                                     reports, coder)
                record = TensorRecord(scheme="vector_codebook", codebook=book, indices=stream,
                                      subvector_size=tensor.subvector_size, layout=0, **common)
            case _:
                raise TypeError(f"{name}: cannot encode {type(tensor).__name__}")
        return EncodedTensor(record, reports)
