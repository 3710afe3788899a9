"""Seeds and structure-aware mutators of the loader fuzzer (`tools/fuzz.py`).

A seed is a valid packed file taken apart once (preamble fields, raw FlatBuffer index, index
records, data section). Each mutator makes one kind of damage and, where the damage would
otherwise stop at a checksum, repairs the checksums, so the damage reaches the parser, the
decoders, the architecture checks or onnxruntime behind them. Every mutator is a pure function
of its `random.Random`, so a case is reproduced from (campaign seed, case number) alone.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
import zstandard
from onnx import TensorProto, helper
from torch import nn

from packer import index_builder
from packer.encode import DataSection, Encoder
from packer.writer import layout
from runtime import zoo
from runtime.coders import CODERS
from runtime.format.dtypes import _TABLE as DTYPES
from runtime.format.index import parse_index
from runtime.format.preamble import PREAMBLE_SIZE
from runtime.format.records import (
    ARCH_KINDS,
    SCHEMES,
    ArchitectureRecord,
    ArrayRecord,
    BlobRef,
    InputSpec,
    ModelRecord,
    StreamRecord,
    TensorRecord,
)
from runtime.onnx.graph import EXTERNAL_LOCATION, IR_VERSION, OPSET, export_module, weight_free
from runtime.tensors import (
    CompressedTensor,
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)
from tools.make_corpus import assemble, assemble_stored, split

FUZZ_INDEX_LEVEL = 3  # re-encoded indexes: zstd level 3 is ~10x faster than 19 on them
CIFAR_SPEC = InputSpec((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAPH_SPEC = InputSpec((3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
SUM_SPEC = InputSpec((3, 2, 2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
_PRE = struct.Struct("<8sHHIQQQQQII")

# --- seeds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A valid packed file and its parts, parsed once."""

    name: str
    blob: bytes
    fields: list
    index: bytes  # the raw FlatBuffer
    model: ModelRecord
    data: bytes

    @classmethod
    def parse(cls, name: str, blob: bytes) -> Seed:
        fields, index, data = split(blob)
        return cls(name, blob, fields, index, parse_index(index), data)

    @property
    def is_graph(self) -> bool:
        return self.model.architecture.kind == "onnx_graph"

    def with_model(self, model: ModelRecord, compress: bool = True) -> bytes:
        """The file with `model` as its index (index checksum correct), same data."""
        return assemble(self.fields, index_builder.build_index(model), self.data, compress,
                        level=FUZZ_INDEX_LEVEL)


def _scheme_tensors(scheme: str, g: torch.Generator) -> dict[str, CompressedTensor]:
    """A small and a larger tensor of `scheme` (the larger one crosses the Huffman decoder's
    small-stream threshold when stored raw; a 300-letter alphabet takes 16-bit symbols)."""
    small, large = (16, 3, 3, 3), (64, 16, 3, 3)
    if scheme == "raw":
        return {"conv1.weight": RawTensor(torch.randn(small, generator=g), torch.float32),
                "layer1.0.conv1.weight": RawTensor(torch.randn(12288, generator=g),
                                                   torch.float32),
                "bn1.running_var": RawTensor(torch.rand(16, generator=g).half(),
                                             torch.float32),
                "bn1.num_batches_tracked": RawTensor(torch.tensor(7), torch.int64)}
    if scheme == "uniform":
        codes = torch.randint(-15, 16, small, generator=g, dtype=torch.int32)
        wide = torch.randint(0, 256, large, generator=g, dtype=torch.int32)
        return {"conv1.weight": UniformTensor(codes, torch.rand(16, generator=g) + 0.01, None,
                                              5, 0),
                "layer1.0.conv1.weight": UniformTensor(wide, torch.tensor([0.02]),
                                                       torch.tensor([128]), 8, None)}
    if scheme == "scalar_codebook":
        return {"conv1.weight": ScalarCodebookTensor(
                    torch.linspace(-1, 1, 16), torch.randint(0, 16, small, generator=g)),
                "layer1.0.conv1.weight": ScalarCodebookTensor(
                    torch.linspace(-1, 1, 300), torch.randint(0, 300, large, generator=g))}
    return {"conv1.weight": VectorCodebookTensor(
                torch.randn(16, 9, generator=g), torch.randint(0, 16, (48,), generator=g),
                small),
            "layer1.0.conv1.weight": VectorCodebookTensor(
                torch.randn(256, 4, generator=g).half(),
                torch.randint(0, 256, (2304,), generator=g), large)}


def _write(tensors: dict[str, CompressedTensor], coder: str,
           architecture: ArchitectureRecord, spec: InputSpec, data: DataSection | None = None,
           num_classes: int = 10) -> bytes:
    data = data or DataSection(64)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in tensors.items())
    model = ModelRecord(
        producer="weightpack fuzz seed", method="test", method_config_json='{"k":16}',
        source_sha256="0" * 64, architecture=architecture, input=spec,
        num_classes=num_classes, tensors=records, fp32_bytes=4096,
        class_names=tuple(f"class{i}" for i in range(num_classes)),
        activation_scales=(("conv1", 0.05),))
    return b"".join(layout(model, data).chunks)


def _kmeans(weight: torch.Tensor, k: int = 16) -> ScalarCodebookTensor:
    """Nearest of `k` evenly spaced levels: a deterministic stand-in for a method's output."""
    codebook = torch.linspace(float(weight.min()), float(weight.max()), k)
    indices = torch.argmin((weight.reshape(-1, 1) - codebook).abs(), dim=1)
    return ScalarCodebookTensor(codebook, indices.reshape(weight.shape))


class _TinyNet(nn.Module):
    """The graph seed's model: no zoo builder knows it, so its graph travels in the file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_seeds() -> dict[str, bytes]:
    """Every scheme x coder (4 x 4 small onnx_graph files whose graph adds up each tensor, so
    a file that decodes also loads and runs), a whole cifar_resnet20 builder file, and an
    onnx_graph file exported from a small conv net. All load unmutated; deterministic."""
    seeds: dict[str, bytes] = {}
    for scheme in SCHEMES:
        for coder in CODERS:
            g = torch.Generator().manual_seed(len(seeds))
            tensors = _scheme_tensors(scheme, g)
            data = DataSection(64)
            ref = data.add(_sum_graph(tensors).SerializeToString())
            seeds[f"{scheme}-{coder}"] = _write(tensors, coder,
                                                ArchitectureRecord("onnx_graph", graph=ref),
                                                SUM_SPEC, data, num_classes=1)
    torch.manual_seed(0)
    state = zoo.build("cifar_resnet20").state_dict()
    tensors = {n: _kmeans(v) if v.dim() > 1 else RawTensor(v, v.dtype) for n, v in state.items()}
    seeds["resnet20-kmeans"] = _write(tensors, "auto", ArchitectureRecord(
        "builder", "cifar_resnet20", "{}"), CIFAR_SPEC)
    seeds["graph-tiny"] = _graph_seed()
    return seeds


def _sum_graph(tensors: dict[str, CompressedTensor]) -> onnx.ModelProto:
    """logits[N, 1] = mean(input) + the sum of every element of every weight: a weight-free
    graph that reads each tensor of the file, whatever its shape and dtype."""
    inits, nodes, sums = [], [], []
    for i, (name, t) in enumerate(tensors.items()):
        dtype = helper.np_dtype_to_tensor_dtype(np.dtype(str(t.dtype).removeprefix("torch.")))
        init = TensorProto(name=name, data_type=dtype, dims=list(t.shape))
        init.data_location = TensorProto.EXTERNAL
        init.external_data.add(key="location", value=EXTERNAL_LOCATION)
        inits.append(init)
        nodes += [helper.make_node("Cast", [name], [f"f{i}"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", [f"f{i}"], [f"s{i}"], keepdims=0)]
        sums.append(f"s{i}")
    nodes += [helper.make_node("Sum", sums, ["total"]),
              helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=1),
              helper.make_node("Flatten", ["mean"], ["mean2"], axis=1),
              helper.make_node("Add", ["mean2", "total"], ["logits"])]
    graph = helper.make_graph(
        nodes, "sum", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     ["N", *SUM_SPEC.shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def _graph_seed() -> bytes:
    torch.manual_seed(1)
    module = _TinyNet().eval()
    graph = export_module(module, GRAPH_SPEC.shape)
    state = module.state_dict()
    names = {t.name for t in graph.graph.initializer} & set(state)
    data = DataSection(64)
    ref = data.add(weight_free(graph, names).SerializeToString(deterministic=True))
    tensors = {n: _kmeans(state[n], 8) if n == "conv.weight" else RawTensor(state[n],
                                                                             state[n].dtype)
               for n in sorted(names)}
    return _write(tensors, "auto", ArchitectureRecord("onnx_graph", graph=ref), GRAPH_SPEC,
                  data, num_classes=4)


# --- helpers shared by mutators ---------------------------------------------------------------


def interesting(rng: random.Random, current: int, bits: int, signed: bool = False) -> int:
    """A boundary-flavoured replacement for an integer field of `bits` bits."""
    top = 1 << bits
    choice = rng.randrange(9)
    value = [0, 1, current + 1, current - 1, current * 2, current // 2 + 1,
             (1 << rng.randrange(bits)) - rng.randrange(2), top - 1,
             rng.randrange(top)][choice]
    value %= top
    if signed and value >= top // 2:
        value -= top
    return value


def blob_labels(model: ModelRecord) -> list[tuple[str, BlobRef]]:
    """Like ModelRecord.blobs(), labelled with the raw names (blobs() escapes them)."""
    out = [(f"{t.name}/{role}", part.blob) for t in model.tensors
           for role, part in [*t.streams(), *t.arrays()]]
    if model.architecture.graph is not None:
        out.append(("architecture/graph", model.architecture.graph))
    return out


def map_blobs(model: ModelRecord, change: Callable[[str, BlobRef], BlobRef]) -> ModelRecord:
    """`model` with every blob reference passed through `change(label, ref)`."""
    tensors = []
    for t in model.tensors:
        streams = {role: replace(s, blob=change(f"{t.name}/{role}", s.blob))
                   for role, s in t.streams()}
        arrays = {role: replace(a, blob=change(f"{t.name}/{role}", a.blob))
                  for role, a in t.arrays()}
        tensors.append(replace(t, **streams, **arrays))
    arch = model.architecture
    if arch.graph is not None:
        arch = replace(arch, graph=change("architecture/graph", arch.graph))
    return replace(model, tensors=tuple(tensors), architecture=arch)


def relayout(seed: Seed, new_bytes: dict[str, bytes], model: ModelRecord | None = None) -> bytes:
    """The file with blobs `new_bytes` (label -> bytes) replaced, the data section laid out
    again (aligned, zero padded) and every offset, length and CRC-32 in the index updated."""
    model = model or seed.model
    section = DataSection(seed.fields[9])
    placed: dict[str, BlobRef] = {}
    for label, ref in sorted(blob_labels(model), key=lambda item: item[1].offset):
        payload = new_bytes.get(label, seed.data[ref.offset:ref.offset + ref.length])
        placed[label] = section.add(payload)
    rebuilt = map_blobs(model, lambda label, ref: placed[label])
    return assemble(seed.fields, index_builder.build_index(rebuilt), b"".join(section.parts),
                    True, level=FUZZ_INDEX_LEVEL)


def blob_bytes(seed: Seed, label: str) -> bytes:
    ref = dict(blob_labels(seed.model))[label]
    return seed.data[ref.offset:ref.offset + ref.length]


def _damage(rng: random.Random, payload: bytes) -> bytes:
    """One of: flip bits, zero/0xff/random a range, cut, extend, or swap two ranges."""
    out = bytearray(payload)
    kind = rng.randrange(6)
    if not out:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind in (1, 2):
        a = rng.randrange(len(out))
        b = min(len(out), a + rng.randint(1, 64))
        out[a:b] = bytes(b - a) if kind == 1 else bytes(rng.randrange(256) for _ in range(b - a))
    elif kind == 3:
        out = out[: rng.randrange(len(out))]
    elif kind == 4:
        out += bytes(rng.choice((0, rng.randrange(256))) for _ in range(rng.randint(1, 16)))
    else:
        out = bytearray(b"\xff" * len(out)) if rng.random() < 0.3 else out[::-1]
    return bytes(out)


# --- byte-level mutators ----------------------------------------------------------------------

Mutator = Callable[[random.Random, Seed], bytes | None]


def bitflip(rng: random.Random, seed: Seed) -> bytes:
    """1-8 bit flips, half of them in the preamble and index (where the structure is)."""
    out = bytearray(seed.blob)
    head = PREAMBLE_SIZE + seed.fields[5]
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(head) if rng.random() < 0.5 else rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, seed: Seed) -> bytes:
    """Cut anywhere, often near a section boundary."""
    marks = [PREAMBLE_SIZE, PREAMBLE_SIZE + seed.fields[5], seed.fields[6], len(seed.blob)]
    if rng.random() < 0.5:
        return seed.blob[: max(0, rng.choice(marks) + rng.randint(-8, 8))]
    return seed.blob[: rng.randrange(len(seed.blob))]


def insert(rng: random.Random, seed: Seed) -> bytes:
    """1-64 zero or random bytes inserted anywhere."""
    pos = rng.randrange(len(seed.blob) + 1)
    n = rng.randint(1, 64)
    extra = bytes(n) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(n))
    return seed.blob[:pos] + extra + seed.blob[pos:]


def duplicate(rng: random.Random, seed: Seed) -> bytes:
    """A slice of the file copied over, or inserted at, another place."""
    blob = seed.blob
    a = rng.randrange(len(blob))
    piece = blob[a:a + rng.randint(1, 512)]
    pos = rng.randrange(len(blob))
    if rng.random() < 0.5:
        return blob[:pos] + piece + blob[pos:]
    return blob[:pos] + piece + blob[pos + len(piece):]


_PREAMBLE_FIELDS = {  # struct position -> (bits, name)
    1: 16, 2: 16, 3: 32, 4: 64, 5: 64, 6: 64, 7: 64, 8: 64, 9: 32, 10: 32}


def preamble(rng: random.Random, seed: Seed) -> bytes:
    """One preamble field set to a boundary value; the index CRC usually kept consistent."""
    fields = list(_PRE.unpack_from(seed.blob))
    slot = rng.choice(list(_PREAMBLE_FIELDS))
    fields[slot] = interesting(rng, fields[slot], _PREAMBLE_FIELDS[slot])
    head = _PRE.pack(*fields)
    if slot != 10 and rng.random() < 0.7:  # keep the index checksum right for that index
        start, size = fields[4], fields[5]
        fields[10] = zlib.crc32(seed.blob[start:start + size]) if start + size <= len(
            seed.blob) else fields[10]
        head = _PRE.pack(*fields)
    return head + seed.blob[PREAMBLE_SIZE:]


def index_raw(rng: random.Random, seed: Seed) -> bytes:
    """Blind damage inside the FlatBuffer (offsets, enum bytes, vtables), then the index is
    compressed (or not) and checksummed again, so the parser sees the damage."""
    index = bytearray(seed.index)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 6)):
            index[rng.randrange(len(index))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        pos = rng.randrange(len(index) - 4)
        index[pos:pos + 4] = interesting(rng, int.from_bytes(index[pos:pos + 4], "little"),
                                         32).to_bytes(4, "little")
    elif kind == 2:
        pos = rng.randrange(len(index))
        index[pos] = rng.choice((0, 1, 4, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    else:
        a, b = sorted(rng.randrange(len(index)) for _ in range(2))
        index[a:b] = bytes(b - a) if rng.random() < 0.5 else index[a:b][::-1]
    return assemble(seed.fields, bytes(index), seed.data, rng.random() < 0.8,
                    level=FUZZ_INDEX_LEVEL)


def blob_damage(rng: random.Random, seed: Seed) -> bytes:
    """A payload (coded stream, array or graph) damaged, with its CRC, offsets and lengths
    fixed up so the damage reaches the decoder."""
    label, _ = rng.choice(blob_labels(seed.model))
    return relayout(seed, {label: _damage(rng, blob_bytes(seed, label))})


def zstd_frame(rng: random.Random, seed: Seed) -> bytes | None:
    """A zstd frame's header or block headers damaged: a zstd-coded stream (CRC fixed) or
    the compressed index (preamble CRC fixed)."""
    labels = [f"{t.name}/{role}" for t in seed.model.tensors for role, s in t.streams()
              if s.coder == "zstd"]
    if rng.random() < 0.3 or not labels:
        frame = seed.blob[PREAMBLE_SIZE:PREAMBLE_SIZE + seed.fields[5]]
        if not seed.fields[3] & 1:
            frame = zstandard.ZstdCompressor(level=FUZZ_INDEX_LEVEL).compress(seed.index)
        return assemble_stored(seed.fields, _damage_frame(rng, frame), seed.data)
    label = rng.choice(labels)
    return relayout(seed, {label: _damage_frame(rng, blob_bytes(seed, label))})


def _damage_frame(rng: random.Random, frame: bytes) -> bytes:
    out = bytearray(frame)
    kind = rng.randrange(5)
    params = zstandard.get_frame_parameters(frame)
    header = zstandard.frame_header_size(frame)
    if kind == 0:  # the declared content size
        declared = interesting(rng, max(0, params.content_size), 64)
        return bytes(out[:4]) + bytes([0xE0]) + declared.to_bytes(8, "little") + bytes(
            out[header:])
    if kind == 1:  # frame header descriptor / window descriptor bytes
        pos = rng.randrange(4, header)
        out[pos] = rng.randrange(256)
    elif kind == 2 and len(out) > header + 3:  # first block header: type, size, last flag
        block = int.from_bytes(out[header:header + 3], "little")
        block ^= 1 << rng.randrange(24)
        out[header:header + 3] = block.to_bytes(3, "little")
    elif kind == 3:
        out = out[: rng.randrange(len(out))]
    else:
        out += zstandard.ZstdCompressor(level=1).compress(bytes(rng.randrange(1, 64)))
    return bytes(out)


# --- index-field mutators: parse, change one field, rebuild -----------------------------------


def _pick_tensor(rng: random.Random, model: ModelRecord) -> tuple[int, TensorRecord]:
    i = rng.randrange(len(model.tensors))
    return i, model.tensors[i]


def _set_tensor(model: ModelRecord, i: int, tensor: TensorRecord) -> ModelRecord:
    tensors = list(model.tensors)
    tensors[i] = tensor
    return replace(model, tensors=tuple(tensors))


def _shape(rng: random.Random, shape: tuple[int, ...]) -> tuple[int, ...]:
    kind = rng.randrange(6)
    if kind == 0 or not shape:
        return tuple(rng.choice((0, 1, 2, 3, 16, 1 << 20)) for _ in range(rng.randint(0, 9)))
    dims = list(shape)
    j = rng.randrange(len(dims))
    if kind == 1:
        dims[j] = interesting(rng, dims[j], 64)
    elif kind == 2:
        dims[j], dims[-1] = dims[-1], dims[j]
        dims.reverse()
    elif kind == 3:
        dims.insert(j, rng.choice((1, 2, 0)))
    elif kind == 4:
        dims.pop(j)
    else:
        dims[j] = dims[j] * rng.choice((2, 1 << 10, 1 << 20))
    return tuple(dims)


def _stream(rng: random.Random, s: StreamRecord) -> StreamRecord:
    field = rng.choice(["coder", "version", "alphabet", "count", "bits", "code_lengths",
                        "frequencies", "precision", "chunk_offsets", "chunk_size", "entropy"])
    if field == "coder":
        return replace(s, coder=rng.choice(CODERS))
    if field == "version":
        return replace(s, version=interesting(rng, s.version, 16))
    if field == "alphabet":
        return replace(s, alphabet_size=interesting(rng, s.alphabet_size, 32))
    if field == "count":
        return replace(s, count=interesting(rng, s.count, 64))
    if field == "bits":
        return replace(s, bits=interesting(rng, s.bits, 8))
    if field == "precision":
        return replace(s, precision=interesting(rng, s.precision, 8))
    if field == "chunk_size":
        return replace(s, chunk_size=interesting(rng, s.chunk_size, 32))
    if field == "entropy":
        return replace(s, entropy_bits=rng.choice((float("nan"), float("inf"), -1.0, 1e308)))
    name = {"code_lengths": "code_lengths", "frequencies": "frequencies",
            "chunk_offsets": "chunk_offsets"}[field]
    bits = {"code_lengths": 8, "frequencies": 32, "chunk_offsets": 64}[field]
    return replace(s, **{name: _table(rng, getattr(s, name), bits)})


def _table(rng: random.Random, table: np.ndarray | None, bits: int) -> np.ndarray | None:
    dtype = {8: np.uint8, 32: np.uint32, 64: np.uint64}[bits]
    kind = rng.randrange(5)
    if kind == 0:
        return None
    if table is None or kind == 1:
        n = rng.choice((0, 1, 2, 255, 256, 65536))
        return np.full(n, interesting(rng, 1, bits), dtype=dtype)
    out = np.array(table, dtype=dtype, copy=True)
    if kind == 2 and out.size:
        j = rng.randrange(out.size)
        out[j] = interesting(rng, int(out[j]), bits)
        return out
    if kind == 3:
        return out[: rng.randrange(out.size + 1)] if rng.random() < 0.5 else np.concatenate(
            [out, out[:rng.randint(1, 4)]])
    if out.size:  # all weight on one symbol
        total = int(out.astype(np.uint64).sum()) % (1 << bits)
        out[:] = 0
        out[rng.randrange(out.size)] = total
    return out


def _array(rng: random.Random, a: ArrayRecord) -> ArrayRecord:
    if rng.random() < 0.5:
        return replace(a, dtype=rng.choice(list(DTYPES)))
    return replace(a, shape=_shape(rng, a.shape))


def _tensor_field(rng: random.Random, model: ModelRecord) -> ModelRecord:
    i, t = _pick_tensor(rng, model)
    field = rng.choice(["name", "shape", "dtype", "scheme", "scheme_version", "values_dtype",
                        "bits", "symbol_offset", "axis", "subvector_size", "layout", "stream",
                        "array", "drop_part"])
    if field == "name":
        names = [x.name for x in model.tensors]
        name = rng.choice(["", "\x1b[2J\x1b]0;x\x07", "é" * 600, "a" * 1025,
                           rng.choice(names), t.name + "\n", "\udcff".encode(
                               "utf-8", "surrogatepass").decode("utf-8", "replace")])
        return _set_tensor(model, i, replace(t, name=name))
    if field == "shape":
        return _set_tensor(model, i, replace(t, shape=_shape(rng, t.shape)))
    if field in ("dtype", "values_dtype"):
        return _set_tensor(model, i, replace(t, **{field: rng.choice(list(DTYPES))}))
    if field == "scheme":
        return _set_tensor(model, i, replace(t, scheme=rng.choice(SCHEMES)))
    if field in ("scheme_version", "bits", "layout"):
        width = 16 if field == "scheme_version" else 8
        return _set_tensor(model, i, replace(t, **{field: interesting(
            rng, getattr(t, field), width)}))
    if field == "symbol_offset":
        return _set_tensor(model, i, replace(t, symbol_offset=interesting(
            rng, t.symbol_offset, 32, signed=True)))
    if field == "axis":
        return _set_tensor(model, i, replace(t, axis=interesting(rng, t.axis, 8, signed=True)))
    if field == "subvector_size":
        return _set_tensor(model, i, replace(t, subvector_size=interesting(
            rng, t.subvector_size, 32)))
    if field == "stream" and t.streams():
        role, s = rng.choice(t.streams())
        return _set_tensor(model, i, replace(t, **{role: _stream(rng, s)}))
    if field == "array" and t.arrays():
        role, a = rng.choice(t.arrays())
        return _set_tensor(model, i, replace(t, **{role: _array(rng, a)}))
    parts = [r for r, _ in t.streams()] + [r for r, _ in t.arrays()]
    return _set_tensor(model, i, replace(t, **{rng.choice(parts): None})) if parts else model


def _blob_field(rng: random.Random, model: ModelRecord) -> ModelRecord:
    label, target = rng.choice(blob_labels(model))
    others = [ref for _, ref in blob_labels(model)]
    field = rng.randrange(4)

    def change(lab: str, ref: BlobRef) -> BlobRef:
        if lab != label:
            return ref
        if field == 0:
            return replace(ref, offset=interesting(rng, ref.offset, 64))
        if field == 1:
            return replace(ref, length=interesting(rng, ref.length, 64))
        if field == 2:
            return replace(ref, crc32=interesting(rng, ref.crc32, 32))
        return rng.choice(others)  # two references to one blob

    return map_blobs(model, change)


def _model_field(rng: random.Random, model: ModelRecord) -> ModelRecord:
    field = rng.choice(["builder", "kwargs", "kind", "json", "input", "classes", "scales",
                        "tensors", "num_classes"])
    deep = "[" * 100_000 + "]" * 100_000
    if field == "builder":
        name = rng.choice(["torchvision.resnet50", "torchvision.regnet_y_128gf", "timm.x",
                           "os.system", "", "cifar_resnet56", "torchvision.vit_h_14"])
        return replace(model, architecture=replace(model.architecture, builder=name))
    if field == "kwargs":
        kwargs = rng.choice(['{"num_classes": 1000000}', '{"num_classes": 0}', deep,
                             '{"evil": 1}', "[1]", "{", '{"num_classes": 1e400}',
                             '{"dropout": 2}', '{"num_classes": true}'])
        return replace(model, architecture=replace(model.architecture, kwargs_json=kwargs))
    if field == "kind":
        return replace(model, architecture=replace(model.architecture,
                                                   kind=rng.choice(ARCH_KINDS)))
    if field == "json":
        text = rng.choice([deep, "{", "null", '"x"', "[" * 999 + "]" * 999, "1e999"])
        return replace(model, **{rng.choice(["metadata_json", "method_config_json",
                                             "calibration_json"]): text})
    if field == "input":
        spec = model.input
        return replace(model, input=rng.choice([
            replace(spec, shape=_shape(rng, spec.shape)),
            replace(spec, mean=(float("nan"),) * 3),
            replace(spec, std=(0.0, 1.0, 1.0)),
            replace(spec, resize=interesting(rng, spec.resize or 0, 32)),
            replace(spec, crop=interesting(rng, spec.crop or 0, 32)),
            replace(spec, shape=(3, 1 << 20, 1 << 20))]))
    if field == "classes":
        return replace(model, class_names=rng.choice([
            ("\x1b[31mred",), tuple(str(i) for i in range(5000)), ("a" * 2000,), ()]))
    if field == "scales":
        return replace(model, activation_scales=rng.choice([
            (("conv1", float("nan")),), (("conv1", -1.0),), (("\x00", 1.0),) * 3,
            tuple((f"m{i}", 1.0) for i in range(3000))]))
    if field == "num_classes":
        return replace(model, num_classes=interesting(rng, model.num_classes, 32))
    tensors = list(model.tensors)
    kind = rng.randrange(4)
    if kind == 0 and tensors:
        tensors.pop(rng.randrange(len(tensors)))
    elif kind == 1 and tensors:
        tensors.append(rng.choice(tensors))
    elif kind == 2:
        rng.shuffle(tensors)
    elif tensors:
        i, j = rng.randrange(len(tensors)), rng.randrange(len(tensors))
        tensors[i], tensors[j] = replace(tensors[i], name=tensors[j].name), replace(
            tensors[j], name=tensors[i].name)
    return replace(model, tensors=tuple(tensors))


def index_field(rng: random.Random, seed: Seed) -> bytes | None:
    """Parse the index, change one field of one record, and rebuild it (so the FlatBuffer
    stays well formed and only the meaning is hostile)."""
    change = rng.choice([_tensor_field, _tensor_field, _tensor_field, _blob_field,
                         _model_field])
    try:
        model = change(rng, seed.model)
        return seed.with_model(model, compress=rng.random() < 0.9)
    except (struct.error, ValueError, OverflowError, TypeError):
        return None  # a value the FlatBuffers builder itself cannot write: draw again


# --- graph mutators (onnx_graph seeds) --------------------------------------------------------

_LOCATIONS = ("weightpack", "secret.bin", "../secret.bin", "/etc/hostname", "", "weightpack/x")


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def graph_field(rng: random.Random, seed: Seed) -> bytes | None:
    """The stored ONNX graph parsed, changed in one place, serialized, CRC fixed."""
    if not seed.is_graph:
        return None
    model = onnx.load_from_string(blob_bytes(seed, "architecture/graph"))
    graph = model.graph
    kind = rng.randrange(12)
    init = rng.choice(list(graph.initializer))
    if kind == 0:
        del init.external_data[:]
        init.data_location = TensorProto.EXTERNAL
        init.external_data.add(key="location", value=rng.choice(_LOCATIONS))
    elif kind == 1:
        init.dims[:] = [interesting(rng, d, 31) for d in init.dims] or [1 << 30]
    elif kind == 2:
        init.data_type = rng.choice([TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL,
                                     TensorProto.STRING, TensorProto.BFLOAT16, 99])
    elif kind == 3:
        init.name = rng.choice(["not.in.file", "", graph.initializer[0].name])
    elif kind == 4:
        node = rng.choice(list(graph.node))
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "x"])
    elif kind == 5:
        node = rng.choice(list(graph.node))
        node.op_type = rng.choice(["Loop", "Scan", "Bogus", "Identity", "If"])
    elif kind == 6:
        del graph.node[rng.randrange(len(graph.node))]
    elif kind == 7:
        sub = helper.make_graph([helper.make_node("Identity", ["s"], ["out"])], "then", [],
                                [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])])
        values = _external("s", rng.choice(_LOCATIONS))
        indices = helper.make_tensor("si", TensorProto.INT64, [4], [0, 1, 2, 3])
        sub.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        graph.node.extend([helper.make_node("Constant", [], ["cond"], value=cond),
                           helper.make_node("If", ["cond"], ["leak"], then_branch=sub,
                                            else_branch=sub)])
    elif kind == 8:
        model.opset_import[0].version = rng.choice([1, 7, 99, 0])
    elif kind == 9:
        model.ir_version = rng.choice([0, 3, 14, 99])
    elif kind == 10:
        graph.input[0].type.tensor_type.shape.dim[rng.randrange(4)].dim_value = rng.choice(
            [0, 1, 1 << 40])
    else:
        value = _external("t", rng.choice(_LOCATIONS))
        model.training_info.add().initialization.node.append(
            helper.make_node("Constant", [], ["t"], value=value))
    return relayout(seed, {"architecture/graph": model.SerializeToString()})


def inflate(rng: random.Random, seed: Seed) -> bytes:
    """The memory attack, made consistent: one tensor re-declared with up to twice the
    elements the whole-file bound allows, coded in a few bytes (an ans stream with one present
    symbol, or a zstd frame of zeros), its stored graph weight re-declared to match, so the
    case decodes (and loads) what the index declares or is refused by the bound."""
    from runtime.format.reader import FREE_ELEMENTS, MAX_ELEMENTS_PER_BYTE

    allowed = FREE_ELEMENTS + MAX_ELEMENTS_PER_BYTE * len(seed.blob)
    n = rng.choice([1 << 20, 1 << 22, 1 << 23, 1 << 23, int(allowed * rng.uniform(0.5, 2.0))])
    i, t = _pick_tensor(rng, seed.model)
    label = t.name
    if rng.random() < 0.5:
        freq = np.zeros(2, np.uint32)
        freq[rng.randrange(2)] = 1 << 24
        record = TensorRecord(
            name=t.name, shape=(n,), dtype="float32", scheme="scalar_codebook",
            codebook=ArrayRecord(BlobRef(0, 0, 0), "float32", (2,)),
            indices=StreamRecord("ans", 1, blob=BlobRef(0, 0, 0), alphabet_size=2, count=n,
                                 frequencies=freq, precision=24))
        blobs = {f"{label}/codebook": np.array([0.25, -0.5], "<f4").tobytes(),
                 f"{label}/indices": b""}
    else:
        record = TensorRecord(
            name=t.name, shape=(n,), dtype="float32", scheme="raw", values_dtype="float32",
            values=StreamRecord("zstd", 1, blob=BlobRef(0, 0, 0), alphabet_size=256,
                                count=4 * n, bits=8))
        blobs = {f"{label}/values": zstandard.ZstdCompressor(level=1).compress(bytes(4 * n))}
    model = _set_tensor(seed.model, i, record)
    if seed.is_graph:
        graph = onnx.load_from_string(blob_bytes(seed, "architecture/graph"))
        for init in graph.graph.initializer:
            if init.name == t.name:
                init.data_type = TensorProto.FLOAT
                init.dims[:] = [n]
        blobs["architecture/graph"] = graph.SerializeToString()
    # relayout places blobs by the model's references: give new ones the old tensor's slot
    old = [s.blob for _, s in t.streams()] + [a.blob for _, a in t.arrays()]
    offset = min((b.offset for b in old), default=0)
    model = map_blobs(model, lambda lab, ref: replace(ref, offset=offset)
                      if lab.startswith(f"{label}/") else ref)
    return relayout(seed, blobs, model)


MUTATORS: dict[str, Mutator] = {
    "bitflip": bitflip, "truncate": truncate, "insert": insert, "duplicate": duplicate,
    "preamble": preamble, "index_raw": index_raw, "index_field": index_field,
    "blob_damage": blob_damage, "zstd_frame": zstd_frame, "graph_field": graph_field,
    "inflate": inflate,
}


def make_case(seeds: list[Seed], campaign: int, number: int) -> tuple[str, str, bytes]:
    """Case `number` of campaign `campaign`: (seed name, mutator name, file bytes)."""
    rng = random.Random(f"{campaign}:{number}")
    seed = seeds[number % len(seeds)]
    names = [m for m in MUTATORS if m != "graph_field" or seed.is_graph]
    while True:
        name = rng.choice(names)
        blob = MUTATORS[name](rng, seed)
        if blob is not None:
            return seed.name, name, blob


def write_seeds(folder: Path) -> None:
    """The seeds as files (to reproduce a case by hand)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in build_seeds().items():
        (folder / f"{name}.fb").write_bytes(blob)


def seed_list(blobs: dict[str, bytes]) -> list[Seed]:
    return [Seed.parse(name, blob) for name, blob in blobs.items()]


