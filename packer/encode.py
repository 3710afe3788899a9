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


REFERENCE_MARGIN_PERCENT = 1
"""The size a file's `auto` streams are held to: each coded by ``encode_best`` at this margin
(the writer's rule before issue 12, at most 1% over the smallest coder per stream)."""

FILE_MARGIN_PERCENT = 1
"""How far a file's `auto` streams may come over that reference (``Encoder.plan``)."""

SLOW_DECODE_COST = {"huffman": 1, "ans": 1, "runs": 2}
"""Decode time per symbol of the slow coders, relative (docs/CODERS.md, "Measurements"):
``runs`` decodes two ``ans`` streams (run tokens and the other symbols) and scatters them."""


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
    """One `auto` stream in `Encoder.plan`: the per-stream rule's choice, the reference
    choice, and the slow stream that saves the most bytes per unit of decode time, if any."""

    key: tuple[str, str]
    count: int
    ruled: coders.CodedStream
    reference: coders.CodedStream
    slow: coders.CodedStream | None
    sizes: dict[str, int]

    def gain(self) -> Fraction:
        """Bytes `slow` saves per unit of decode time (exact: the same order everywhere)."""
        assert self.slow is not None
        return Fraction(self.ruled.nbytes - self.slow.nbytes,
                        max(1, self.count) * SLOW_DECODE_COST[self.slow.coder])


def _slow_choice(ruled: coders.CodedStream, candidates: dict[str, coders.CodedStream],
                 count: int) -> coders.CodedStream | None:
    """The slow candidate smaller than `ruled` that saves the most per unit of decode time
    (ties: the earlier in CODERS order)."""
    smaller = [c for c in candidates.values()
               if c.coder in SLOW_DECODE_COST and c.nbytes < ruled.nbytes]
    return max(smaller, default=None, key=lambda c: Fraction(
        ruled.nbytes - c.nbytes, max(1, count) * SLOW_DECODE_COST[c.coder]))


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
        ``FILE_MARGIN_PERCENT`` over the reference (every stream at
        ``REFERENCE_MARGIN_PERCENT``), streams take a slow coder, those saving the most bytes
        per unit of decode time (``SLOW_DECODE_COST`` per symbol) first, until they do not;
        once a single stream closes the gap, the one of those that costs the least decode
        time ends it. So the file is never more than 1% larger than the reference, and as
        little of it as that allows is decoded slowly. ``tensor()`` then uses these choices;
        `coder_of(name)` is a tensor's own coder setting (None: the encoder's)."""
        streams: list[_Planned] = []
        for name, tensor in tensors.items():
            if (coder_of(name) or self.coder) != "auto":
                continue
            for role, symbols, alphabet in stream_symbols(tensor):
                candidates = coders.encode_candidates(np.ascontiguousarray(symbols.reshape(-1)),
                                                      alphabet)
                ruled = coders.pick(candidates)
                streams.append(_Planned(
                    (name, role), int(symbols.size), ruled,
                    coders.pick(candidates, REFERENCE_MARGIN_PERCENT),
                    _slow_choice(ruled, candidates, int(symbols.size)),
                    {k: c.nbytes for k, c in candidates.items()}))
        total = sum(s.ruled.nbytes for s in streams)
        limit = sum(s.reference.nbytes for s in streams) * (100 + FILE_MARGIN_PERCENT) // 100
        # Most bytes saved per unit of decode time first (ties keep the file's order).
        gains = sorted((s for s in streams if s.slow is not None), key=lambda s: -s.gain())
        while gains and total > limit:
            closing = [s for s in gains if s.ruled.nbytes - s.slow.nbytes >= total - limit]
            s = (min(closing, key=lambda s: s.count * SLOW_DECODE_COST[s.slow.coder])
                 if closing else gains[0])
            gains.remove(s)
            total -= s.ruled.nbytes - s.slow.nbytes
            s.ruled = s.slow
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
                half = tensor.scales.dtype == torch.float16  # feature half_scales
                scales = self.array(tensor.scales.to(torch.float16 if half else torch.float32)
                                    .reshape(-1))
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
