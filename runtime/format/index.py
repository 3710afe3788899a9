"""Parse the FlatBuffers index into records, validating every field before it is used.

The tensor tables (and the class names), whose number grows with the model, are read column by
column (runtime.format.columns: one numpy gather per field for all tensors); the few tables
read once go through the generated bindings. The Python FlatBuffers runtime has no verifier, so
any malformed offset surfaces as a struct/Index/Value error there; all of those are turned into
one FormatError here.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from runtime.coders import CODERS, FORMAT_VERSION as CODER_VERSION
from runtime.errors import FormatError, LimitExceeded, UnsupportedVersion, WeightpackError
from runtime.format.columns import FlatBuffer, Tables, Vectors
from runtime.format.dtypes import name_of_code
from runtime.format.generated.weightpack.fb.Model import Model
from runtime.format.preamble import INDEX_IDENTIFIER
from runtime.format.records import (
    ARCH_KINDS,
    SCHEME_VERSION,
    SCHEMES,
    ActivationQuantRecord,
    ArchitectureRecord,
    ArrayRecord,
    BlobRef,
    ChannelGateRecord,
    InputSpec,
    ModelRecord,
    StreamRecord,
    TensorRecord,
)

MAX_TENSORS = 1_000_000
MAX_DIMS = 8
MAX_NUMEL = 1 << 40
MAX_NAME_BYTES = 1024
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
MAX_ALPHABET = 1 << 16
MAX_CLASSES = 1 << 20
MAX_ENTRIES = 1 << 21  # tensors, class names and activation scales together
MAX_INPUT_CHANNELS = 64
# One input image as the file declares it (C x H x W, and C x side^2 for resize and crop): a
# service builds inputs of this size, so a hostile file must not declare gigabytes (fuzz case
# 85804 of campaign 10: 3 x 33,554,432 x 32). 2^26 elements = 256 MiB at fp32; a 3 x 4096 x
# 4096 image is 50 M.
MAX_INPUT_ELEMENTS = 1 << 26
MAX_FEATURES = 64
MAX_ACTIVATION_BITS = 8


def parse_index(buf: bytes | memoryview) -> ModelRecord:
    if len(buf) < 8 or bytes(buf[4:8]) != INDEX_IDENTIFIER:
        raise FormatError("index is not a weightpack FlatBuffer (bad file identifier)")
    buf = bytes(buf)  # one copy of a memoryview: both readers slice it
    try:
        return _Parser(buf).model(Model.GetRootAs(buf, 0))
    except WeightpackError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        raise FormatError(f"index is malformed ({type(exc).__name__}: {exc})") from None


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack += [(child, depth) for child in (item.values() if isinstance(item, dict)
                                                   else item)]
    return deepest


def _vector_start(fb: Model, vtable_offset: int) -> int:
    """Where the elements of a vector field of the root table start (as the bindings read it)."""
    return fb._tab.Vector(fb._tab.Offset(vtable_offset))


def _enum(value: int, names: tuple[str, ...], what: str) -> str:
    if value >= len(names):
        raise UnsupportedVersion(
            f"{what} code {value} is unknown to this runtime; the file needs a newer weightpack"
        )
    return names[value]


class _Parser:
    """One parse of one index, charging every table, vector and string it reads to a budget.

    FlatBuffers address tables by offset, so a crafted index can reference one table (or one
    65536-entry vector) from a million places; every per-entry cap then holds while the parse
    copies gigabytes. An honest index stores each table, vector and string once, so reading it
    costs at most its own length: the budget is that length, and the parse's time and memory
    are linear in the index size whatever the references.
    """

    def __init__(self, buf: bytes):
        self.left = len(buf)
        self.entries = 0
        self.flat = FlatBuffer(buf)

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise LimitExceeded(f"index refers to more data than it holds (at {what}): a table "
                                "or vector is referenced more than once")

    def count_entries(self, n: int, what: str) -> None:
        self.entries += n
        if self.entries > MAX_ENTRIES:
            raise LimitExceeded(f"index lists {self.entries} entries (at {what}), over the cap "
                                f"of {MAX_ENTRIES} tensors, class names and scales together")

    def text(self, raw: bytes | None, what: str, cap: int = MAX_NAME_BYTES) -> str:
        if raw is None:
            return ""
        if len(raw) > cap:
            raise LimitExceeded(f"{what} is {len(raw)} bytes, over the {cap}-byte cap")
        self.charge(len(raw) + 5, what)  # length prefix and terminating zero
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not valid UTF-8") from None

    def json(self, raw: bytes | None, what: str) -> str:
        text = self.text(raw, what, MAX_JSON_BYTES) or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"{what} is not valid JSON") from None
        except RecursionError:  # deeper than the interpreter's stack allows here
            value = None
        else:
            if _depth(value) <= MAX_JSON_DEPTH:
                return text
        # A fixed cap, so whether a file opens does not depend on the caller's stack depth
        # (and every later json.loads/dumps of the text has room).
        raise LimitExceeded(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")

    def shape(self, n: int, get, what: str, itemsize: int = 8) -> tuple[int, ...]:
        if n > MAX_DIMS:
            raise LimitExceeded(f"{what} has {n} dimensions, over the cap of {MAX_DIMS}")
        if n:
            self.charge(4 + n * itemsize, what)
        shape = tuple(int(get(i)) for i in range(n))
        numel = 1
        for d in shape:
            numel *= d  # Python ints: no overflow
        if numel > MAX_NUMEL:
            raise LimitExceeded(f"{what} has {numel} elements, over the cap of {MAX_NUMEL}")
        return shape

    def blob(self, fb, what: str) -> BlobRef:
        if fb is None:
            raise FormatError(f"{what}: a blob reference is missing")
        self.charge(4, what)
        return BlobRef(int(fb.Offset()), int(fb.Length()), int(fb.Crc32()))

    def texts(self, strings: Vectors, what: str, count: int) -> list[str]:
        """The strings of ``count`` tables ("" where absent), capped and charged first."""
        out = [""] * count
        if not strings.length.size:
            return out
        longest = int(strings.length.max())
        if longest > MAX_NAME_BYTES:
            raise LimitExceeded(f"{what} is {longest} bytes, over the {MAX_NAME_BYTES}-byte cap")
        self.charge(int(strings.length.sum()) + 5 * strings.length.size, what)
        raw = self.flat.raw
        try:
            for i, start, length in zip(np.flatnonzero(strings.has).tolist(),
                                        strings.start.tolist(), strings.length.tolist(),
                                        strict=True):
                out[i] = raw[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not valid UTF-8") from None
        return out

    def shapes(self, tables: Tables, slot: int, whats: list[str]) -> list[tuple[int, ...]]:
        """Shape vector ``slot`` (u64 dims) of every table, capped and charged first."""
        dims = tables.vectors(slot, 8, "a shape")
        counts = dims.lengths()
        if counts.size and int(counts.max()) > MAX_DIMS:
            worst = int(np.argmax(counts))
            raise LimitExceeded(f"{whats[worst]} has {int(counts[worst])} dimensions, over the "
                                f"cap of {MAX_DIMS}")
        used = counts[counts > 0]
        if used.size:
            self.charge(int(4 * used.size + 8 * used.sum()), "shapes")
        values = self.flat.gather(dims.start, dims.length, "<u8").tolist()
        out, at = [], 0
        for n, what in zip(counts.tolist(), whats, strict=True):
            shape = tuple(values[at:at + n])
            at += n
            numel = 1
            for d in shape:
                numel *= d  # Python ints: no overflow
            if numel > MAX_NUMEL:
                raise LimitExceeded(f"{what} has {numel} elements, over the cap of {MAX_NUMEL}")
            out.append(shape)
        return out

    def blobs(self, tables: Tables, whats: list[str]) -> list[BlobRef]:
        """The required BlobRef (field 0) of every table."""
        has, refs = tables.tables(0, "a blob reference")
        if not has.all():
            raise FormatError(f"{whats[int(np.argmin(has))]}: a blob reference is missing")
        self.charge(4 * len(refs), "blob references")
        offsets = refs.scalar(0, "<u8").tolist()
        lengths = refs.scalar(1, "<u8").tolist()
        crcs = refs.scalar(2, "<u4").tolist()
        return [BlobRef(*ref) for ref in zip(offsets, lengths, crcs, strict=True)]

    def vectors(self, tables: Tables, slot: int, dtype: str, caps: np.ndarray, name: str,
                whats: list[str]) -> list[np.ndarray | None]:
        """Numeric vector ``slot`` of every table (None where absent), capped and charged
        before anything is copied."""
        vec = tables.vectors(slot, np.dtype(dtype).itemsize, name)
        counts = vec.lengths()
        over = np.flatnonzero(counts > caps)
        if over.size:
            i = int(over[0])
            raise LimitExceeded(f"{whats[i]}: {name} has {int(counts[i])} entries, over the cap "
                                f"of {int(caps[i])}")
        if not vec.length.size:
            return [None] * len(tables)
        self.charge(int(4 * vec.length.size + vec.length.sum() * np.dtype(dtype).itemsize),
                    f"{name} vectors")
        values = self.flat.gather(vec.start, vec.length, dtype)
        out: list[np.ndarray | None] = [None] * len(tables)
        at = 0
        for i, n in zip(np.flatnonzero(vec.has).tolist(), vec.length.tolist(), strict=True):
            out[i] = values[at:at + n]
            at += n
        return out

    def arrays(self, tables: Tables, whats: list[str]) -> list[ArrayRecord]:
        self.charge(4 * len(tables), "arrays")
        blobs = self.blobs(tables, whats)
        dtypes = [name_of_code(code) for code in tables.scalar(1, "u1").tolist()]
        shapes = self.shapes(tables, 2, whats)
        return [ArrayRecord(*fields) for fields in zip(blobs, dtypes, shapes, strict=True)]

    def streams(self, tables: Tables, whats: list[str]) -> list[StreamRecord]:
        self.charge(4 * len(tables), "streams")
        coders = tables.scalar(1, "u1").tolist()
        versions = tables.scalar(2, "<u2").tolist()
        alphabets = tables.scalar(3, "<u4").tolist()
        counts = tables.scalar(4, "<u8").tolist()
        for what, coder, version, alphabet, count in zip(whats, coders, versions, alphabets,
                                                         counts, strict=True):
            coder = _enum(coder, CODERS, f"{what} coder")
            if version != CODER_VERSION:
                raise UnsupportedVersion(
                    f"{what}: coder {coder} version {version} is unknown; this runtime reads "
                    f"version {CODER_VERSION}")
            if not 1 <= alphabet <= MAX_ALPHABET:
                raise LimitExceeded(f"{what}: alphabet size {alphabet} is outside "
                                    f"1..{MAX_ALPHABET}")
            if count > MAX_NUMEL:
                raise LimitExceeded(f"{what}: {count} symbols, over the cap of {MAX_NUMEL}")
        blobs = self.blobs(tables, whats)
        alphabet_cap = np.full(len(tables), MAX_ALPHABET, np.int64)
        code_lengths = self.vectors(tables, 6, "u1", alphabet_cap, "CodeLengths", whats)
        frequencies = self.vectors(tables, 7, "<u4", alphabet_cap, "Frequencies", whats)
        chunk_cap = np.maximum(1, np.array(counts, dtype=np.int64))
        chunk_offsets = self.vectors(tables, 9, "<u8", chunk_cap, "ChunkOffsets", whats)
        bits = tables.scalar(5, "u1").tolist()
        precisions = tables.scalar(8, "u1").tolist()
        chunk_sizes = tables.scalar(10, "<u4").tolist()
        entropies = tables.scalar(11, "<f8", 0.0).tolist()
        return [StreamRecord(CODERS[c], v, blob=blob, alphabet_size=k, count=n, bits=b,
                             code_lengths=cl, frequencies=fr, precision=p, chunk_offsets=co,
                             chunk_size=cs, entropy_bits=h)
                for c, v, blob, k, n, b, cl, fr, p, co, cs, h in zip(
                    coders, versions, blobs, alphabets, counts, bits, code_lengths,
                    frequencies, precisions, chunk_offsets, chunk_sizes, entropies, strict=True)]

    def tensors(self, fb: Model) -> tuple[TensorRecord, ...]:
        """Every tensor table, read column by column (one gather per field for all)."""
        n = fb.TensorsLength()
        if n > MAX_TENSORS:
            raise LimitExceeded(f"index lists {n} tensors, over the cap of {MAX_TENSORS}")
        self.count_entries(n, "tensors")
        self.charge(4 * n, "the tensor list")
        if n == 0:
            return ()
        elements = _vector_start(fb, 20) + 4 * np.arange(n, dtype=np.int64)  # Model.tensors
        positions = elements + self.flat.read(elements, "<u4", "the tensor list").astype(
            np.int64)
        t = Tables(self.flat, positions, "a tensor")
        self.charge(4 * n, "the tensors")
        names = self.texts(t.vectors(0, 1, "a tensor name"), "tensor name", n)
        seen: set[str] = set()
        for name in names:
            if not name:
                raise FormatError("a tensor has no name")
            if name in seen:
                raise FormatError(f"tensor names in the index are not unique ({name!r} repeats)")
            seen.add(name)
        schemes = t.scalar(3, "u1").tolist()
        versions = t.scalar(4, "<u2").tolist()
        for name, scheme, version in zip(names, schemes, versions, strict=True):
            scheme = _enum(scheme, SCHEMES, f"tensor {name!r} scheme")
            if version != SCHEME_VERSION:
                raise UnsupportedVersion(
                    f"tensor {name!r}: scheme {scheme} version {version} is unknown; this "
                    f"runtime reads version {SCHEME_VERSION}")
        whats = [f"tensor {name!r}" for name in names]
        shapes = self.shapes(t, 1, whats)
        columns: dict[str, list] = {"name": names, "shape": shapes}
        for field, slot in (("dtype", 2), ("values_dtype", 6)):
            columns[field] = [name_of_code(c) for c in t.scalar(slot, "u1").tolist()]
        columns["scheme"] = [SCHEMES[c] for c in schemes]
        columns["scheme_version"] = versions
        for field, slot, dtype, default in (("bits", 7, "u1", 0), ("symbol_offset", 8, "<i4", 0),
                                            ("axis", 11, "i1", -1),
                                            ("subvector_size", 14, "<u4", 0),
                                            ("layout", 15, "u1", 0)):
            columns[field] = t.scalar(slot, dtype, default).tolist()
        for fields, slots, kind, read in ((("values", "indices"), (5, 13), "stream", self.streams),
                                          (("scales", "zero_points", "codebook"), (9, 10, 12),
                                           "array", self.arrays)):
            found = [(field, t.refs(slot)) for field, slot in zip(fields, slots, strict=True)]
            owners = [(field, i) for field, (has, _) in found
                      for i in np.flatnonzero(has).tolist()]
            positions = np.concatenate([target for _, (_, target) in found])
            labels = [f"{whats[i]} {field.replace('_', ' ')}" for field, i in owners]
            records = read(Tables(self.flat, positions, f"a {kind}"), labels)
            for field in fields:
                columns[field] = [None] * n
            for (field, i), record in zip(owners, records, strict=True):
                columns[field][i] = record
        return tuple(TensorRecord(**dict(zip(columns, row, strict=True)))
                     for row in zip(*columns.values(), strict=True))

    def input_spec(self, fb) -> InputSpec:
        if fb is None:
            raise FormatError("the index has no input spec")
        self.charge(4, "input spec")
        shape = self.shape(fb.ShapeLength(), fb.Shape, "input spec", itemsize=4)
        n_mean, n_std = fb.MeanLength(), fb.StdLength()
        if max(n_mean, n_std) > MAX_INPUT_CHANNELS:
            raise LimitExceeded(f"input spec has over {MAX_INPUT_CHANNELS} mean/std entries")
        self.charge(8 * (n_mean + n_std), "input spec mean and std")
        mean = tuple(float(fb.Mean(i)) for i in range(n_mean))
        std = tuple(float(fb.Std(i)) for i in range(n_std))
        if len(shape) != 3 or not len(mean) == len(std) == shape[0]:
            raise FormatError("input spec needs a C,H,W shape and one mean and std per channel")
        if not all(math.isfinite(m) for m in mean) or not all(0 < s < math.inf for s in std):
            raise FormatError("input spec mean/std must be finite, std positive")
        if min(shape) < 1:
            raise FormatError(f"input spec shape {list(shape)} has an empty dimension")
        resize, crop = fb.Resize(), fb.Crop()
        channels, height, width = shape
        if max(channels * height * width, channels * max(resize, crop) ** 2) > MAX_INPUT_ELEMENTS:
            raise LimitExceeded(f"input spec declares an image over {MAX_INPUT_ELEMENTS:,} "
                                f"elements (shape {list(shape)}, resize {resize}, crop {crop})")
        return InputSpec(shape, mean, std, resize or None, crop or None)

    def architecture(self, fb) -> ArchitectureRecord:
        if fb is None:
            raise FormatError("the index has no architecture")
        self.charge(4, "architecture")
        kind = _enum(fb.Kind(), ARCH_KINDS, "architecture kind")
        graph = fb.Graph()
        record = ArchitectureRecord(
            kind=kind, builder=self.text(fb.BuilderName(), "builder name"),
            kwargs_json=self.json(fb.KwargsJson(), "builder kwargs"),
            graph=self.blob(graph, "architecture graph") if graph is not None else None,
        )
        # Fields of the other kind must be empty (docs/FORMAT.md, "Architecture").
        if (record.graph is not None) if kind == "builder" else (
                record.builder or json.loads(record.kwargs_json) != {}):
            raise FormatError(f"architecture of kind {kind} sets fields of the other kind")
        return record

    def model(self, fb: Model) -> ModelRecord:
        self.charge(4, "the model table")
        tensors = self.tensors(fb)
        class_names = self.class_names(fb)
        return ModelRecord(
            producer=self.text(fb.Producer(), "producer"),
            method=self.text(fb.Method(), "method"),
            method_config_json=self.json(fb.MethodConfigJson(), "method config"),
            source_sha256=self.text(fb.SourceSha256(), "source fingerprint"),
            architecture=self.architecture(fb.Architecture()),
            input=self.input_spec(fb.Input()),
            num_classes=fb.NumClasses(), tensors=tensors, fp32_bytes=fb.Fp32Bytes(),
            class_names=class_names,
            metadata_json=self.json(fb.MetadataJson(), "metadata"),
            activation_scales=self.activation_scales(fb),
            calibration_json=self.json(fb.CalibrationJson(), "calibration")
            if fb.CalibrationJson() else "",
            required_features=self.required_features(fb),
            activation_quant=self.activation_quant(fb),
            channel_gates=self.channel_gates(fb),
        )

    def class_names(self, fb: Model) -> tuple[str, ...]:
        """Model.class_names, a vector of strings read column-wise (ImageNet has 1000)."""
        n = fb.ClassNamesLength()
        if n > MAX_CLASSES:
            raise LimitExceeded(f"{n} class names, over the cap of {MAX_CLASSES}")
        self.count_entries(n, "class names")
        self.charge(4 * n, "the class-name list")
        if n == 0:
            return ()
        elements = _vector_start(fb, 18) + 4 * np.arange(n, dtype=np.int64)  # class_names
        at = elements + self.flat.read(elements, "<u4", "the class-name list").astype(np.int64)
        length = self.flat.read(at, "<u4", "a class name").astype(np.int64)
        self.flat.check(at + 4, length, "a class name")
        strings = Vectors(np.ones(n, dtype=bool), at + 4, length)
        return tuple(self.texts(strings, "class name", n))

    def activation_scales(self, fb: Model) -> tuple[tuple[str, float], ...]:
        n = fb.ActivationScalesLength()
        if n > MAX_TENSORS:
            raise LimitExceeded(f"{n} activation scales, over the cap of {MAX_TENSORS}")
        self.count_entries(n, "activation scales")
        self.charge(4 * n, "the activation-scale list")
        out = []
        for i in range(n):
            entry = fb.ActivationScales(i)
            self.charge(4, "an activation scale")
            scale = float(entry.Scale())
            if not (scale > 0 and scale < float("inf")):
                raise FormatError(f"activation scale {i} is {scale}, not a positive finite "
                                  "number")
            out.append((self.text(entry.Module(), "activation scale module"), scale))
        labels = [label for label, _ in out]
        if "" in labels or len(set(labels)) != len(labels):
            raise FormatError("activation scale labels must be non-empty and unique")
        return tuple(out)

    def required_features(self, fb: Model) -> tuple[str, ...]:
        n = fb.RequiredFeaturesLength()
        if n > MAX_FEATURES:
            raise LimitExceeded(f"{n} required features, over the cap of {MAX_FEATURES}")
        self.charge(4 * n, "the required-feature list")
        return tuple(self.text(fb.RequiredFeatures(i), "required feature") for i in range(n))

    def activation_quant(self, fb: Model) -> tuple[ActivationQuantRecord, ...]:
        n = fb.ActivationQuantLength()
        if n > MAX_TENSORS:
            raise LimitExceeded(f"{n} activation quantizers, over the cap of {MAX_TENSORS}")
        self.count_entries(n, "activation quantizers")
        self.charge(4 * n, "the activation-quantizer list")
        out = []
        for i in range(n):
            entry = fb.ActivationQuant(i)
            self.charge(4, "an activation quantizer")
            module = self.text(entry.Module(), "activation quantizer module")
            bits, clip = int(entry.Bits()), float(entry.Clip())
            if not module or not 1 <= bits <= MAX_ACTIVATION_BITS:
                raise FormatError(f"activation quantizer {i} ({module!r}) needs a module name "
                                  f"and 1..{MAX_ACTIVATION_BITS} bits, not {bits}")
            if not (clip > 0 and math.isfinite(clip)):
                raise FormatError(f"activation quantizer {module!r}: clip {clip} is not a "
                                  "positive finite number")
            out.append(ActivationQuantRecord(module, bits, clip))
        if len({q.module for q in out}) != len(out):
            raise FormatError("two activation quantizers name the same module")
        return tuple(out)

    def channel_gates(self, fb: Model) -> tuple[ChannelGateRecord, ...]:
        n = fb.ChannelGatesLength()
        if n > MAX_TENSORS:
            raise LimitExceeded(f"{n} channel gates, over the cap of {MAX_TENSORS}")
        self.count_entries(n, "channel gates")
        self.charge(4 * n, "the channel-gate list")
        out = []
        for i in range(n):
            entry = fb.ChannelGates(i)
            self.charge(4, "a channel gate")
            module = self.text(entry.Module(), "channel gate module")
            keep = int(entry.Keep())
            if not module or keep < 1:
                raise FormatError(f"channel gate {i} ({module!r}) needs a module name "
                                  f"and keep >= 1, not {keep}")
            out.append(ChannelGateRecord(module, keep))
        if len({g.module for g in out}) != len(out):
            raise FormatError("two channel gates name the same module")
        return tuple(out)
