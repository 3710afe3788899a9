"""Parse the FlatBuffers index into records, validating every field before it is used.

The Python FlatBuffers runtime has no verifier, so any malformed offset surfaces as a
struct/Index/Value error; all of those are turned into one FormatError here.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from runtime.coders import CODERS, FORMAT_VERSION as CODER_VERSION
from runtime.errors import FormatError, LimitExceeded, UnsupportedVersion, WeightpackError
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
    try:
        return _Parser(len(buf)).model(Model.GetRootAs(buf, 0))
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

    def __init__(self, size: int):
        self.left = size
        self.entries = 0

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

    def vector(self, fb, name: str, cap: int, what: str) -> np.ndarray | None:
        if getattr(fb, f"{name}IsNone")():
            return None
        n = getattr(fb, f"{name}Length")()
        if n > cap:
            raise LimitExceeded(f"{what}: {name} has {n} entries, over the cap of {cap}")
        array = getattr(fb, f"{name}AsNumpy")()
        self.charge(4 + array.nbytes, f"{what} {name}")
        return np.array(array, copy=True)

    def array(self, fb, what: str) -> ArrayRecord | None:
        if fb is None:
            return None
        self.charge(4, what)
        dtype = name_of_code(fb.Dtype())
        return ArrayRecord(self.blob(fb.Blob(), what), dtype,
                           self.shape(fb.ShapeLength(), fb.Shape, what))

    def stream(self, fb, what: str) -> StreamRecord | None:
        if fb is None:
            return None
        self.charge(4, what)
        coder = _enum(fb.Coder(), CODERS, f"{what} coder")
        version = fb.CoderVersion()
        if version != CODER_VERSION:
            raise UnsupportedVersion(
                f"{what}: coder {coder} version {version} is unknown; this runtime reads "
                f"version {CODER_VERSION}"
            )
        alphabet = fb.AlphabetSize()
        if not 1 <= alphabet <= MAX_ALPHABET:
            raise LimitExceeded(f"{what}: alphabet size {alphabet} is outside 1..{MAX_ALPHABET}")
        count = fb.Count()
        if count > MAX_NUMEL:
            raise LimitExceeded(f"{what}: {count} symbols, over the cap of {MAX_NUMEL}")
        return StreamRecord(
            blob=self.blob(fb.Blob(), what), coder=coder, version=version,
            alphabet_size=alphabet, count=count, bits=fb.Bits(),
            code_lengths=self.vector(fb, "CodeLengths", MAX_ALPHABET, what),
            frequencies=self.vector(fb, "Frequencies", MAX_ALPHABET, what),
            precision=fb.Precision(),
            chunk_offsets=self.vector(fb, "ChunkOffsets", max(1, count), what),
            chunk_size=fb.ChunkSize(), entropy_bits=float(fb.EntropyBits()),
        )

    def tensor(self, fb, names: set[str]) -> TensorRecord:
        self.charge(4, "a tensor")
        name = self.text(fb.Name(), "tensor name")
        if not name:
            raise FormatError("a tensor has no name")
        if name in names:  # checked as we go: a repeated table stops the parse at once
            raise FormatError(f"tensor names in the index are not unique ({name!r} repeats)")
        names.add(name)
        scheme = _enum(fb.Scheme(), SCHEMES, f"tensor {name!r} scheme")
        if fb.SchemeVersion() != SCHEME_VERSION:
            raise UnsupportedVersion(
                f"tensor {name!r}: scheme {scheme} version {fb.SchemeVersion()} is unknown; "
                f"this runtime reads version {SCHEME_VERSION}"
            )
        what = f"tensor {name!r}"
        return TensorRecord(
            name=name, shape=self.shape(fb.ShapeLength(), fb.Shape, what),
            dtype=name_of_code(fb.Dtype()), scheme=scheme, scheme_version=fb.SchemeVersion(),
            values=self.stream(fb.Values(), f"{what} values"),
            values_dtype=name_of_code(fb.ValuesDtype()), bits=fb.Bits(),
            symbol_offset=fb.SymbolOffset(),
            scales=self.array(fb.Scales(), f"{what} scales"),
            zero_points=self.array(fb.ZeroPoints(), f"{what} zero points"),
            axis=fb.Axis(), codebook=self.array(fb.Codebook(), f"{what} codebook"),
            indices=self.stream(fb.Indices(), f"{what} indices"),
            subvector_size=fb.SubvectorSize(), layout=fb.Layout(),
        )

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
        n = fb.TensorsLength()
        if n > MAX_TENSORS:
            raise LimitExceeded(f"index lists {n} tensors, over the cap of {MAX_TENSORS}")
        self.count_entries(n, "tensors")
        self.charge(4 * n, "the tensor list")
        names: set[str] = set()
        tensors = tuple(self.tensor(fb.Tensors(i), names) for i in range(n))
        n_names = fb.ClassNamesLength()
        if n_names > MAX_CLASSES:
            raise LimitExceeded(f"{n_names} class names, over the cap of {MAX_CLASSES}")
        self.count_entries(n_names, "class names")
        self.charge(4 * n_names, "the class-name list")
        class_names = tuple(self.text(fb.ClassNames(i), "class name") for i in range(n_names))
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
