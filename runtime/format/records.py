"""Plain-Python mirror of the FlatBuffers index.

The reader converts the whole index into these records once, validating as it goes, so no
other module touches generated code or raw offsets; the writer builds the index from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.coders import CoderParams
from runtime.errors import printable

SCHEMES = ("raw", "uniform", "scalar_codebook", "vector_codebook")
ARCH_KINDS = ("builder", "onnx_graph")
SCHEME_VERSION = 1


@dataclass(frozen=True)
class BlobRef:
    offset: int  # relative to the data section
    length: int
    crc32: int


@dataclass(frozen=True)
class ArrayRecord:
    blob: BlobRef
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class StreamRecord(CoderParams):
    """An entropy-coded stream as the index lists it: how it is coded (the coder fields), where
    its payload lies, and how many symbols of which alphabet it holds."""

    blob: BlobRef = field(kw_only=True)
    alphabet_size: int = field(kw_only=True)
    count: int = field(kw_only=True)
    entropy_bits: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str
    scheme_version: int = SCHEME_VERSION
    values: StreamRecord | None = None
    values_dtype: str = "float32"
    bits: int = 0
    symbol_offset: int = 0
    scales: ArrayRecord | None = None
    zero_points: ArrayRecord | None = None
    axis: int = -1
    codebook: ArrayRecord | None = None
    indices: StreamRecord | None = None
    subvector_size: int = 0
    layout: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def streams(self) -> list[tuple[str, StreamRecord]]:
        return [(r, s) for r, s in (("values", self.values), ("indices", self.indices)) if s]

    def arrays(self) -> list[tuple[str, ArrayRecord]]:
        pairs = (("scales", self.scales), ("zero_points", self.zero_points),
                 ("codebook", self.codebook))
        return [(r, a) for r, a in pairs if a]


@dataclass(frozen=True)
class InputSpec:
    """How images are prepared for a model: the one record of it, stored in every packed file,
    given by the zoo for each architecture and read by ``runtime.data.build_transform``.

    ``shape`` is (C, H, W); ``mean`` and ``std`` one value per channel, on images scaled to
    [0, 1]; ``resize`` the shorter side to resize to first and ``crop`` the centre crop size
    (None: neither). Validated where it is used (``build_transform``, the index reader).
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    crop: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for reports."""
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "crop": self.crop}


@dataclass(frozen=True)
class ArchitectureRecord:
    kind: str
    builder: str = ""
    kwargs_json: str = "{}"
    graph: BlobRef | None = None


@dataclass(frozen=True)
class ActivationQuantRecord:
    """The runtime quantizes `module`'s input to `bits` bits on [0, clip] (DoReFa
    activations); the arithmetic is `runtime.activation_quant.quantize_activation`."""

    module: str
    bits: int
    clip: float = 1.0


@dataclass(frozen=True)
class ChannelGateRecord:
    """The runtime gates `module`'s output channels per image, keeping `keep` of them (FBS);
    the predictor is the tensors `<module>.gate.weight` and `.bias`, the arithmetic
    `runtime.gating.gate`."""

    module: str
    keep: int


@dataclass(frozen=True)
class ModelRecord:
    producer: str
    method: str
    method_config_json: str
    source_sha256: str
    architecture: ArchitectureRecord
    input: InputSpec
    num_classes: int
    tensors: tuple[TensorRecord, ...]
    fp32_bytes: int
    class_names: tuple[str, ...] = field(default_factory=tuple)
    metadata_json: str = "{}"
    activation_scales: tuple[tuple[str, float], ...] = ()  # (tensor label, int8 scale)
    calibration_json: str = ""
    required_features: tuple[str, ...] = ()  # format 1.1: see runtime.format.features
    activation_quant: tuple[ActivationQuantRecord, ...] = ()  # feature "activation_quant"
    channel_gates: tuple[ChannelGateRecord, ...] = ()  # format 1.2, feature "channel_gating"

    def blob_refs(self) -> list[BlobRef]:
        """Every blob the index references, in the order of `blobs()` (without labels)."""
        out = [ref.blob for t in self.tensors
               for ref in (t.values, t.indices, t.scales, t.zero_points, t.codebook) if ref]
        if self.architecture.graph is not None:
            out.append(self.architecture.graph)
        return out

    def blobs(self) -> list[tuple[str, BlobRef]]:
        """Every blob the index references, labelled `tensor/role`, in index order."""
        out: list[tuple[str, BlobRef]] = []
        for t in self.tensors:
            name = printable(t.name)  # labels go into messages
            out += [(f"{name}/{role}", s.blob) for role, s in t.streams()]
            out += [(f"{name}/{role}", a.blob) for role, a in t.arrays()]
        if self.architecture.graph is not None:
            out.append(("architecture/graph", self.architecture.graph))
        return out
