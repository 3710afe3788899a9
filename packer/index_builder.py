"""Serialize index records into the FlatBuffers index (the inverse of runtime.format.index)."""

from __future__ import annotations

import flatbuffers
import numpy as np

from runtime.coders import CODERS
from runtime.format.dtypes import code_of
from runtime.format.generated.weightpack.fb import (
    ActivationQuant as FbActQuant,
    ActivationScale as FbActScale,
    Architecture as FbArch,
    Array as FbArray,
    BlobRef as FbBlob,
    ChannelGate as FbChannelGate,
    InputSpec as FbInput,
    Model as FbModel,
    Stream as FbStream,
    Tensor as FbTensor,
)
from runtime.format.preamble import INDEX_IDENTIFIER
from runtime.format.records import (
    ARCH_KINDS,
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


def _numbers(b: flatbuffers.Builder, values, dtype: str) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=dtype))


def _strings(b: flatbuffers.Builder, items: list[str], start) -> int:
    offsets = [b.CreateString(s) for s in items]
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _blob(b: flatbuffers.Builder, ref: BlobRef) -> int:
    FbBlob.Start(b)
    FbBlob.AddOffset(b, ref.offset)
    FbBlob.AddLength(b, ref.length)
    FbBlob.AddCrc32(b, ref.crc32)
    return FbBlob.End(b)


def _array(b: flatbuffers.Builder, arr: ArrayRecord | None) -> int | None:
    if arr is None:
        return None
    shape = _numbers(b, arr.shape, "<u8")
    blob = _blob(b, arr.blob)
    FbArray.Start(b)
    FbArray.AddBlob(b, blob)
    FbArray.AddDtype(b, code_of(arr.dtype))
    FbArray.AddShape(b, shape)
    return FbArray.End(b)


def _stream(b: flatbuffers.Builder, s: StreamRecord | None) -> int | None:
    if s is None:
        return None
    lengths = None if s.code_lengths is None else _numbers(b, s.code_lengths, "u1")
    freqs = None if s.frequencies is None else _numbers(b, s.frequencies, "<u4")
    chunks = None if s.chunk_offsets is None else _numbers(b, s.chunk_offsets, "<u8")
    blob = _blob(b, s.blob)
    FbStream.Start(b)
    FbStream.AddBlob(b, blob)
    FbStream.AddCoder(b, CODERS.index(s.coder))
    FbStream.AddCoderVersion(b, s.version)
    FbStream.AddAlphabetSize(b, s.alphabet_size)
    FbStream.AddCount(b, s.count)
    FbStream.AddBits(b, s.bits)
    if lengths is not None:
        FbStream.AddCodeLengths(b, lengths)
    if freqs is not None:
        FbStream.AddFrequencies(b, freqs)
    FbStream.AddPrecision(b, s.precision)
    if chunks is not None:
        FbStream.AddChunkOffsets(b, chunks)
    FbStream.AddChunkSize(b, s.chunk_size)
    FbStream.AddEntropyBits(b, s.entropy_bits)
    return FbStream.End(b)


def _tensor(b: flatbuffers.Builder, t: TensorRecord) -> int:
    name = b.CreateString(t.name)
    shape = _numbers(b, t.shape, "<u8")
    values, indices = _stream(b, t.values), _stream(b, t.indices)
    scales, zps, book = _array(b, t.scales), _array(b, t.zero_points), _array(b, t.codebook)
    FbTensor.Start(b)
    FbTensor.AddName(b, name)
    FbTensor.AddShape(b, shape)
    FbTensor.AddDtype(b, code_of(t.dtype))
    FbTensor.AddScheme(b, SCHEMES.index(t.scheme))
    FbTensor.AddSchemeVersion(b, t.scheme_version)
    for add, ref in ((FbTensor.AddValues, values), (FbTensor.AddScales, scales),
                     (FbTensor.AddZeroPoints, zps), (FbTensor.AddCodebook, book),
                     (FbTensor.AddIndices, indices)):
        if ref is not None:
            add(b, ref)
    FbTensor.AddValuesDtype(b, code_of(t.values_dtype))
    FbTensor.AddBits(b, t.bits)
    FbTensor.AddSymbolOffset(b, t.symbol_offset)
    FbTensor.AddAxis(b, t.axis)
    FbTensor.AddSubvectorSize(b, t.subvector_size)
    FbTensor.AddLayout(b, t.layout)
    return FbTensor.End(b)


def _input(b: flatbuffers.Builder, spec: InputSpec) -> int:
    shape = _numbers(b, spec.shape, "<u4")
    mean, std = _numbers(b, spec.mean, "<f8"), _numbers(b, spec.std, "<f8")
    FbInput.Start(b)
    FbInput.AddShape(b, shape)
    FbInput.AddMean(b, mean)
    FbInput.AddStd(b, std)
    FbInput.AddResize(b, spec.resize or 0)
    FbInput.AddCrop(b, spec.crop or 0)
    return FbInput.End(b)


def _architecture(b: flatbuffers.Builder, arch: ArchitectureRecord) -> int:
    builder, kwargs = b.CreateString(arch.builder), b.CreateString(arch.kwargs_json)
    graph = None if arch.graph is None else _blob(b, arch.graph)
    FbArch.Start(b)
    FbArch.AddKind(b, ARCH_KINDS.index(arch.kind))
    FbArch.AddBuilderName(b, builder)
    FbArch.AddKwargsJson(b, kwargs)
    if graph is not None:
        FbArch.AddGraph(b, graph)
    return FbArch.End(b)


def _activation_scales(b: flatbuffers.Builder,
                       scales: tuple[tuple[str, float], ...]) -> int | None:
    if not scales:
        return None
    entries = []
    for module, scale in scales:
        name = b.CreateString(module)
        FbActScale.Start(b)
        FbActScale.AddModule(b, name)
        FbActScale.AddScale(b, scale)
        entries.append(FbActScale.End(b))
    FbModel.StartActivationScalesVector(b, len(entries))
    for off in reversed(entries):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _activation_quant(b: flatbuffers.Builder,
                      quantizers: tuple[ActivationQuantRecord, ...]) -> int | None:
    if not quantizers:
        return None
    entries = []
    for q in quantizers:
        name = b.CreateString(q.module)
        FbActQuant.Start(b)
        FbActQuant.AddModule(b, name)
        FbActQuant.AddBits(b, q.bits)
        FbActQuant.AddClip(b, q.clip)
        entries.append(FbActQuant.End(b))
    FbModel.StartActivationQuantVector(b, len(entries))
    for off in reversed(entries):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _channel_gates(b: flatbuffers.Builder, gates: tuple[ChannelGateRecord, ...]) -> int | None:
    if not gates:
        return None
    entries = []
    for g in gates:
        name = b.CreateString(g.module)
        FbChannelGate.Start(b)
        FbChannelGate.AddModule(b, name)
        FbChannelGate.AddKeep(b, g.keep)
        entries.append(FbChannelGate.End(b))
    FbModel.StartChannelGatesVector(b, len(entries))
    for off in reversed(entries):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def build_index(model: ModelRecord) -> bytes:
    b = flatbuffers.Builder(4096)
    tensors = [_tensor(b, t) for t in model.tensors]
    FbModel.StartTensorsVector(b, len(tensors))
    for off in reversed(tensors):
        b.PrependUOffsetTRelative(off)
    tensor_vec = b.EndVector()
    class_names = _strings(b, list(model.class_names), FbModel.StartClassNamesVector)
    strings = [b.CreateString(s) for s in (model.producer, model.method,
                                           model.method_config_json, model.source_sha256,
                                           model.metadata_json)]
    arch, spec = _architecture(b, model.architecture), _input(b, model.input)
    act_scales = _activation_scales(b, model.activation_scales)
    calibration = b.CreateString(model.calibration_json) if model.calibration_json else None
    features = (_strings(b, list(model.required_features), FbModel.StartRequiredFeaturesVector)
                if model.required_features else None)
    act_quant = _activation_quant(b, model.activation_quant)
    gates = _channel_gates(b, model.channel_gates)
    FbModel.Start(b)
    FbModel.AddProducer(b, strings[0])
    FbModel.AddMethod(b, strings[1])
    FbModel.AddMethodConfigJson(b, strings[2])
    FbModel.AddSourceSha256(b, strings[3])
    FbModel.AddArchitecture(b, arch)
    FbModel.AddInput(b, spec)
    FbModel.AddNumClasses(b, model.num_classes)
    FbModel.AddClassNames(b, class_names)
    FbModel.AddTensors(b, tensor_vec)
    FbModel.AddFp32Bytes(b, model.fp32_bytes)
    FbModel.AddMetadataJson(b, strings[4])
    if act_scales is not None:
        FbModel.AddActivationScales(b, act_scales)
    if calibration is not None:
        FbModel.AddCalibrationJson(b, calibration)
    if features is not None:
        FbModel.AddRequiredFeatures(b, features)
    if act_quant is not None:
        FbModel.AddActivationQuant(b, act_quant)
    if gates is not None:
        FbModel.AddChannelGates(b, gates)
    b.Finish(FbModel.End(b), file_identifier=INDEX_IDENTIFIER)
    return bytes(b.Output())
