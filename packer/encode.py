"""Compressed tensors -> index records + data-section blobs, entropy-coding every stream."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

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


FILE_MARGIN_PERCENT = 1
"""A file's `auto` streams together stay within this many percent of the smallest coder per
stream (``Encoder.plan``)."""


def stream_symbols(tensor: CompressedTensor) -> list[tuple[str, np.ndarray, int]]:
    """(role, symbols, alphabet size) of each stream a tensor is coded as."""
    match tensor:
        case RawTensor(values=values):
            return [("values", shuffle_bytes(tensor_to_numpy(values)), 256)]
        case UniformTensor():
            low, _ = tensor.code_range
            return [("indices", (tensor.codes.to(torch.int64) - low).numpy(), 1 << tensor.bits)]
        case ScalarCodebookTensor(codebook=codebook, indices=indices) | VectorCodebookTensor(
                codebook=codebook, indices=indices):
            return [("indices", indices.numpy(), int(codebook.shape[0]))]
    raise TypeError(f"cannot encode {type(tensor).__name__}")


@dataclass
class _Planned:
    """One `auto` stream in `Encoder.plan`: the per-stream rule's choice and the smallest."""

    key: tuple[str, str]
    count: int
    ruled: coders.CodedStream
    smallest: coders.CodedStream
    sizes: dict[str, int]


class Encoder:
    def __init__(self, data: DataSection, coder: str = "auto"):
        if coder not in CODER_CHOICES:
            raise ConfigError(f"unknown coder {coder!r}; choose from {', '.join(CODER_CHOICES)}")
        self.data = data
        self.coder = coder
        self.planned: dict[tuple[str, str], tuple[coders.CodedStream, dict[str, int]]] = {}

    def plan(self, tensors: dict[str, CompressedTensor],
             coder_of: Callable[[str], str | None] = lambda name: None) -> None:
        """Choose the coder of every `auto` stream of a whole file before any is encoded.

        Each stream first gets ``encode_best``'s choice (a fast coder unless a slow one saves
        more than ``SLOW_MARGIN_PERCENT``). If the file's streams then come to more than
        ``FILE_MARGIN_PERCENT`` over the smallest coder for every stream, the streams where a
        slow coder saves the most bytes per symbol (per unit of decode time: the slow coders
        decode at a roughly constant rate per symbol) take it, one by one, until they do not.
        So the file is never more than 1% larger than the smallest choice, and as little of
        it as that allows is decoded slowly. ``tensor()`` then uses these choices;
        `coder_of(name)` is a tensor's own coder setting (None: the encoder's)."""
        streams: list[_Planned] = []
        for name, tensor in tensors.items():
            if (coder_of(name) or self.coder) != "auto":
                continue
            for role, symbols, alphabet in stream_symbols(tensor):
                candidates = coders.encode_candidates(np.ascontiguousarray(symbols.reshape(-1)),
                                                      alphabet)
                streams.append(_Planned((name, role), int(symbols.size),
                                        coders.pick(candidates), coders.pick(candidates, 0),
                                        {k: s.nbytes for k, s in candidates.items()}))
        total = sum(s.ruled.nbytes for s in streams)
        floor = sum(s.smallest.nbytes for s in streams)
        gains = [s for s in streams if s.smallest.nbytes < s.ruled.nbytes]
        # Most bytes saved per symbol first (exact fractions: the same order on every platform;
        # ties keep the file's order); once one stream alone closes the gap, the one of them
        # with the fewest symbols ends it.
        gains.sort(key=lambda s: -Fraction(s.ruled.nbytes - s.smallest.nbytes, max(1, s.count)))
        while gains and total * 100 > floor * (100 + FILE_MARGIN_PERCENT):
            excess = total - floor * (100 + FILE_MARGIN_PERCENT) // 100
            closing = [s for s in gains if s.ruled.nbytes - s.smallest.nbytes >= excess]
            s = min(closing, key=lambda s: s.count) if closing else gains[0]
            gains.remove(s)
            total -= s.ruled.nbytes - s.smallest.nbytes
            s.ruled = s.smallest
        self.planned = {s.key: (s.ruled, s.sizes) for s in streams}

    def stream(self, symbols: np.ndarray, alphabet: int, role: str,
               reports: list[StreamReport], coder: str,
               planned: tuple[coders.CodedStream, dict[str, int]] | None = None
               ) -> StreamRecord:
        symbols = np.ascontiguousarray(symbols.reshape(-1))
        if coder == "auto" and planned is not None:
            coded, tried = planned
        elif coder == "auto":
            coded, tried = coders.encode_best(symbols, alphabet)
        elif not coders.applies(coder, symbols.size, alphabet):
            raise ConfigError(f"{role}: coder {coder} cannot code {symbols.size} symbols over "
                              f"{alphabet} letters (docs/CODERS.md); use auto or another")
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
        # The arrays go into the data section before the stream (the order files always had).
        match tensor:
            case RawTensor(values=values):
                fields = {"scheme": "raw", "values_dtype": name_of_torch(values.dtype)}
            case UniformTensor():
                low, _ = tensor.code_range
                scales = self.array(tensor.scales.to(torch.float32).reshape(-1))
                zps = (None if tensor.zero_points is None
                       else self.array(tensor.zero_points.to(torch.int32).reshape(-1)))
                fields = {"scheme": "uniform", "bits": tensor.bits, "symbol_offset": low,
                          "scales": scales, "zero_points": zps,
                          "axis": -1 if tensor.axis is None else tensor.axis}
            case ScalarCodebookTensor(codebook=codebook):
                fields = {"scheme": "scalar_codebook", "codebook": self.array(codebook)}
            case VectorCodebookTensor(codebook=codebook):
                fields = {"scheme": "vector_codebook", "codebook": self.array(codebook),
                          "subvector_size": tensor.subvector_size, "layout": 0}
            case _:
                raise TypeError(f"{name}: cannot encode {type(tensor).__name__}")
        for role, symbols, alphabet in stream_symbols(tensor):
            fields[role] = self.stream(symbols, alphabet, role, reports, coder,
                                       self.planned.get((name, role)))
        record = TensorRecord(**fields, **common)
        return EncodedTensor(record, reports)
