"""Parse the FlatBuffers index into records, validating every field before it is used.

The Python FlatBuffers runtime has no verifier, so any malformed offset surfaces as a
struct/Index/Value error; all of those are turned into one FormatError here.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from runtime.errors import FormatError, LimitExceeded, UnsupportedVersion, WeightpackError
from runtime.format.dtypes import name_of_code
from runtime.format.generated.weightpack.fb.Model import Model
from runtime.format.preamble import INDEX_IDENTIFIER
from runtime.format.records import (
    ARCH_KINDS,
    CODER_NAMES,
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
MAX_ALPHABET = 1 << 16
MAX_CLASSES = 1 << 20
MAX_INPUT_CHANNELS = 64
MAX_FEATURES = 64
MAX_ACTIVATION_BITS = 8
CODER_VERSIONS = {"raw": 1, "zstd": 1, "huffman": 1, "ans": 1}


def parse_index(buf: bytes | memoryview) -> ModelRecord:
    if len(buf) < 8 or bytes(buf[4:8]) != INDEX_IDENTIFIER:
        raise FormatError("index is not a weightpack FlatBuffer (bad file identifier)")
    try:
        return _model(Model.GetRootAs(buf, 0))
    except WeightpackError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, OverflowError) as exc:
        raise FormatError(f"index is malformed ({type(exc).__name__}: {exc})") from None


def _text(raw: bytes | None, what: str, cap: int = MAX_NAME_BYTES) -> str:
    if raw is None:
        return ""
    if len(raw) > cap:
        raise LimitExceeded(f"{what} is {len(raw)} bytes, over the {cap}-byte cap")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid UTF-8") from None


def _json(raw: bytes | None, what: str) -> str:
    text = _text(raw, what, MAX_JSON_BYTES) or "{}"
    try:
        json.loads(text)
    except json.JSONDecodeError:
        raise FormatError(f"{what} is not valid JSON") from None
    return text


def _enum(value: int, names: tuple[str, ...], what: str) -> str:
    if value >= len(names):
        raise UnsupportedVersion(
            f"{what} code {value} is unknown to this runtime; the file needs a newer weightpack"
        )
    return names[value]


def _shape(n: int, get, what: str) -> tuple[int, ...]:
    if n > MAX_DIMS:
        raise LimitExceeded(f"{what} has {n} dimensions, over the cap of {MAX_DIMS}")
    shape = tuple(int(get(i)) for i in range(n))
    numel = 1
    for d in shape:
        numel *= d  # Python ints: no overflow
    if numel > MAX_NUMEL:
        raise LimitExceeded(f"{what} has {numel} elements, over the cap of {MAX_NUMEL}")
    return shape


def _blob(fb) -> BlobRef:
    if fb is None:
        raise FormatError("a blob reference is missing")
    return BlobRef(int(fb.Offset()), int(fb.Length()), int(fb.Crc32()))


def _vector(fb, name: str, cap: int) -> np.ndarray | None:
    if getattr(fb, f"{name}IsNone")():
        return None
    n = getattr(fb, f"{name}Length")()
    if n > cap:
        raise LimitExceeded(f"{name} has {n} entries, over the cap of {cap}")
    return np.array(getattr(fb, f"{name}AsNumpy")(), copy=True)


def _array(fb, what: str) -> ArrayRecord | None:
    if fb is None:
        return None
    dtype = name_of_code(fb.Dtype())
    return ArrayRecord(_blob(fb.Blob()), dtype, _shape(fb.ShapeLength(), fb.Shape, what))


def _stream(fb, what: str) -> StreamRecord | None:
    if fb is None:
        return None
    coder = _enum(fb.Coder(), CODER_NAMES, f"{what} coder")
    version = fb.CoderVersion()
    if version != CODER_VERSIONS[coder]:
        raise UnsupportedVersion(
            f"{what}: coder {coder} version {version} is unknown; this runtime reads version "
            f"{CODER_VERSIONS[coder]}"
        )
    alphabet = fb.AlphabetSize()
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise LimitExceeded(f"{what}: alphabet size {alphabet} is outside 1..{MAX_ALPHABET}")
    count = fb.Count()
    if count > MAX_NUMEL:
        raise LimitExceeded(f"{what}: {count} symbols, over the cap of {MAX_NUMEL}")
    return StreamRecord(
        blob=_blob(fb.Blob()), coder=coder, coder_version=version, alphabet_size=alphabet,
        count=count, bits=fb.Bits(),
        code_lengths=_vector(fb, "CodeLengths", MAX_ALPHABET),
        frequencies=_vector(fb, "Frequencies", MAX_ALPHABET),
        precision=fb.Precision(),
        chunk_offsets=_vector(fb, "ChunkOffsets", max(1, count)),
        chunk_size=fb.ChunkSize(), entropy_bits=float(fb.EntropyBits()),
    )


def _tensor(fb) -> TensorRecord:
    name = _text(fb.Name(), "tensor name")
    if not name:
        raise FormatError("a tensor has no name")
    scheme = _enum(fb.Scheme(), SCHEMES, f"tensor {name!r} scheme")
    if fb.SchemeVersion() != SCHEME_VERSION:
        raise UnsupportedVersion(
            f"tensor {name!r}: scheme {scheme} version {fb.SchemeVersion()} is unknown; "
            f"this runtime reads version {SCHEME_VERSION}"
        )
    return TensorRecord(
        name=name, shape=_shape(fb.ShapeLength(), fb.Shape, f"tensor {name!r}"),
        dtype=name_of_code(fb.Dtype()), scheme=scheme, scheme_version=fb.SchemeVersion(),
        values=_stream(fb.Values(), f"tensor {name!r} values"),
        values_dtype=name_of_code(fb.ValuesDtype()), bits=fb.Bits(),
        symbol_offset=fb.SymbolOffset(),
        scales=_array(fb.Scales(), f"tensor {name!r} scales"),
        zero_points=_array(fb.ZeroPoints(), f"tensor {name!r} zero points"),
        axis=fb.Axis(), codebook=_array(fb.Codebook(), f"tensor {name!r} codebook"),
        indices=_stream(fb.Indices(), f"tensor {name!r} indices"),
        subvector_size=fb.SubvectorSize(), layout=fb.Layout(),
    )


def _input_spec(fb) -> InputSpec:
    if fb is None:
        raise FormatError("the index has no input spec")
    shape = _shape(fb.ShapeLength(), fb.Shape, "input spec")
    if max(fb.MeanLength(), fb.StdLength()) > MAX_INPUT_CHANNELS:
        raise LimitExceeded(f"input spec has over {MAX_INPUT_CHANNELS} mean/std entries")
    mean = tuple(float(fb.Mean(i)) for i in range(fb.MeanLength()))
    std = tuple(float(fb.Std(i)) for i in range(fb.StdLength()))
    if len(shape) != 3 or not len(mean) == len(std) == shape[0]:
        raise FormatError("input spec needs a C,H,W shape and one mean and std per channel")
    if not all(math.isfinite(m) for m in mean) or not all(0 < s < math.inf for s in std):
        raise FormatError("input spec mean/std must be finite, std positive")
    return InputSpec(shape, mean, std, fb.Resize() or None, fb.Crop() or None)


def _architecture(fb) -> ArchitectureRecord:
    if fb is None:
        raise FormatError("the index has no architecture")
    kind = _enum(fb.Kind(), ARCH_KINDS, "architecture kind")
    graph = fb.Graph()
    record = ArchitectureRecord(
        kind=kind, builder=_text(fb.BuilderName(), "builder name"),
        kwargs_json=_json(fb.KwargsJson(), "builder kwargs"),
        graph=_blob(graph) if graph is not None else None,
    )
    # Fields of the other kind must be empty (docs/FORMAT.md, "Architecture").
    if (record.graph is not None) if kind == "builder" else (
            record.builder or json.loads(record.kwargs_json) != {}):
        raise FormatError(f"architecture of kind {kind} sets fields of the other kind")
    return record


def _model(fb: Model) -> ModelRecord:
    n = fb.TensorsLength()
    if n > MAX_TENSORS:
        raise LimitExceeded(f"index lists {n} tensors, over the cap of {MAX_TENSORS}")
    tensors = tuple(_tensor(fb.Tensors(i)) for i in range(n))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise FormatError("tensor names in the index are not unique")
    n_names = fb.ClassNamesLength()
    if n_names > MAX_CLASSES:
        raise LimitExceeded(f"{n_names} class names, over the cap of {MAX_CLASSES}")
    return ModelRecord(
        producer=_text(fb.Producer(), "producer"), method=_text(fb.Method(), "method"),
        method_config_json=_json(fb.MethodConfigJson(), "method config"),
        source_sha256=_text(fb.SourceSha256(), "source fingerprint"),
        architecture=_architecture(fb.Architecture()), input=_input_spec(fb.Input()),
        num_classes=fb.NumClasses(), tensors=tensors, fp32_bytes=fb.Fp32Bytes(),
        class_names=tuple(_text(fb.ClassNames(i), "class name") for i in range(n_names)),
        metadata_json=_json(fb.MetadataJson(), "metadata"),
        activation_scales=_activation_scales(fb),
        calibration_json=_json(fb.CalibrationJson(), "calibration") if fb.CalibrationJson()
        else "",
        required_features=_required_features(fb),
        activation_quant=_activation_quant(fb),
        channel_gates=_channel_gates(fb),
    )


def _required_features(fb: Model) -> tuple[str, ...]:
    n = fb.RequiredFeaturesLength()
    if n > MAX_FEATURES:
        raise LimitExceeded(f"{n} required features, over the cap of {MAX_FEATURES}")
    return tuple(_text(fb.RequiredFeatures(i), "required feature") for i in range(n))


def _activation_quant(fb: Model) -> tuple[ActivationQuantRecord, ...]:
    n = fb.ActivationQuantLength()
    if n > MAX_TENSORS:
        raise LimitExceeded(f"{n} activation quantizers, over the cap of {MAX_TENSORS}")
    out = []
    for i in range(n):
        entry = fb.ActivationQuant(i)
        module = _text(entry.Module(), "activation quantizer module")
        bits, clip = int(entry.Bits()), float(entry.Clip())
        if not module or not 1 <= bits <= MAX_ACTIVATION_BITS:
            raise FormatError(f"activation quantizer {i} ({module!r}) needs a module name and "
                              f"1..{MAX_ACTIVATION_BITS} bits, not {bits}")
        if not (clip > 0 and math.isfinite(clip)):
            raise FormatError(f"activation quantizer {module!r}: clip {clip} is not a "
                              "positive finite number")
        out.append(ActivationQuantRecord(module, bits, clip))
    if len({q.module for q in out}) != len(out):
        raise FormatError("two activation quantizers name the same module")
    return tuple(out)


def _channel_gates(fb: Model) -> tuple[ChannelGateRecord, ...]:
    n = fb.ChannelGatesLength()
    if n > MAX_TENSORS:
        raise LimitExceeded(f"{n} channel gates, over the cap of {MAX_TENSORS}")
    out = []
    for i in range(n):
        entry = fb.ChannelGates(i)
        module = _text(entry.Module(), "channel gate module")
        keep = int(entry.Keep())
        if not module or keep < 1:
            raise FormatError(f"channel gate {i} ({module!r}) needs a module name and keep >= 1, "
                              f"not {keep}")
        out.append(ChannelGateRecord(module, keep))
    if len({g.module for g in out}) != len(out):
        raise FormatError("two channel gates name the same module")
    return tuple(out)


def _activation_scales(fb: Model) -> tuple[tuple[str, float], ...]:
    n = fb.ActivationScalesLength()
    if n > MAX_TENSORS:
        raise LimitExceeded(f"{n} activation scales, over the cap of {MAX_TENSORS}")
    out = []
    for i in range(n):
        entry = fb.ActivationScales(i)
        scale = float(entry.Scale())
        if not (scale > 0 and scale < float("inf")):
            raise FormatError(f"activation scale {i} is {scale}, not a positive finite number")
        out.append((_text(entry.Module(), "activation scale module"), scale))
    labels = [label for label, _ in out]
    if "" in labels or len(set(labels)) != len(labels):
        raise FormatError("activation scale labels must be non-empty and unique")
    return tuple(out)
