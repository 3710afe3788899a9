"""The packing pipeline: checkpoint -> method -> entropy coding -> packed file -> report."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from packer import __version__
from packer.architecture import GRAPH, ResolvedArchitecture, resolve
from packer.checkpoint import load_checkpoint
from packer.class_names import class_names_for
from packer.config import MethodConfig, collect_settings, load_config_file
from packer.encode import DataSection, Encoder
from packer.methods import METHODS, CompressJob, Method, resolve_method
from packer.methods.none import raw_tensor
from packer.writer import write_packed
from runtime import quant, zoo
from runtime.atomic import check_output
from runtime.data import calibration_dataset, calibration_root, make_loader
from runtime.decode import decode_state_dict
from runtime.distributed import launch_rank
from runtime.errors import ConfigError, DataError, WeightpackError
from runtime.format.features import ACTIVATION_QUANT, CHANNEL_GATING
from runtime.format.preamble import DEFAULT_ALIGNMENT
from runtime.format.reader import open_packed
from runtime.format.records import ArchitectureRecord, InputSpec, ModelRecord
from runtime.onnx.graph import export_module, weight_free
from runtime.report import size_report
from runtime.tensors import CompressedTensor
from runtime.zoo.specs import IMAGENET_MEAN, IMAGENET_STD

COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class PackRequest:
    source: Path
    output: Path
    method: str = "kmeans"
    config_file: Path | None = None
    overrides: list[str] = field(default_factory=list)
    arch: str | None = None
    coder: str = "auto"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, ...] | None = None
    trust_pickle: bool = False
    seed: int = 0
    progress: bool = True
    data: Any = None
    alignment: int = DEFAULT_ALIGNMENT
    calib_data: Path | None = None  # calibrate int8 activation scales on these images
    calib_images: int = 512
    calib_method: str = "percentile"
    workers: int = 2
    class_names_file: Path | None = None  # one class name per line (else from the data folder)


def _compressible(module: nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):  # TorchScript keeps the class name only
        return getattr(module, "original_name", "") in {c.__name__ for c in COMPRESSIBLE}
    return isinstance(module, COMPRESSIBLE)


def compressible_weights(model: nn.Module) -> list[str]:
    """Conv and Linear weights, in module order: what methods compress by default."""
    return [f"{n}.weight" for n, m in model.named_modules() if _compressible(m)]


def _input_spec(req: PackRequest, arch: str, traced_shape: tuple[int, ...] | None) -> InputSpec:
    """The architecture's default spec (ImageNet statistics for a graph, the shape a traced
    TorchScript file recorded), with the user's --input-size, --mean and --std on top."""
    if arch == GRAPH:
        size = req.input_size or traced_shape
        if size is None:
            raise ConfigError("a model stored as a graph needs --input-size C,H,W (this "
                              "checkpoint records no input shape; a torch.jit.trace file does)")
        channels = size[0]
        spec = InputSpec(tuple(size), IMAGENET_MEAN[:channels], IMAGENET_STD[:channels])
    else:
        spec = zoo.input_spec(arch)
    spec = replace(spec, **{k: tuple(v) for k, v in (("shape", req.input_size),
                                                        ("mean", req.mean), ("std", req.std))
                            if v is not None})
    if not len(spec.mean) == len(spec.std) == spec.shape[0]:
        raise ConfigError("--mean and --std need one value per input channel")
    return spec


def _fp32_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(4 * t.numel() for t in state_dict.values() if t.is_floating_point())


def pack(req: PackRequest) -> dict[str, Any]:
    """Run the whole pipeline; returns the size report of the written file. Everything the
    user can get wrong (output path, options, checkpoint, names) is checked before the
    method's work starts, which may be hours of training."""
    check_output(req.output)
    started = time.perf_counter()
    method = resolve_method(req.method)
    file_doc = load_config_file(req.config_file) if req.config_file else {}
    config = method.build_config(collect_settings(file_doc, req.overrides))
    checkpoint = load_checkpoint(req.source, trust_pickle=req.trust_pickle)
    arch = resolve(checkpoint.state_dict, req.arch, checkpoint.module)
    state_dict = arch.model.state_dict()
    weights = compressible_weights(arch.model)
    # Settings may name the tensors a stage adds (fbs: `*.gate.method=none`).
    _check_globs(config, [*state_dict, *method.added_tensors(arch.model, config)],
                 [n.rsplit(".", 1)[0] for n in weights])
    targets = [n for n in weights if config.for_tensor(n).get("method") != "none"]
    if not targets and req.method != "none":
        raise WeightpackError("the model has no Conv or Linear weight left to compress")
    _check_features(req, arch, method.required_features(config))
    spec = _input_spec(req, arch.name, checkpoint.input_shape)
    num_classes = _num_classes(arch.model, spec)
    if req.data is not None and not Path(req.data.root).is_dir():
        raise DataError(f"training data folder not found: {req.data.root}")
    _warn_unused_data(req, method)
    if req.calib_data is not None:
        if req.calib_images < 1:
            raise ConfigError("--calib-images must be at least 1")
        calibration_root(req.calib_data)  # the folder exists, or one line now, not after hours
    class_names = class_names_for(req.class_names_file, req.data, req.calib_data, num_classes)

    source_fp32_bytes = _fp32_bytes(state_dict)  # the ratio's denominator: the source alone

    torch.manual_seed(req.seed)
    job = CompressJob(arch.model, state_dict, targets, config, req.seed, req.progress, req.data)
    compressed: dict[str, CompressedTensor] = method.compress(job)
    # A stage may have changed the model (fbs: gates), adding tensors to job.state_dict.
    tensors = {name: compressed.get(name) or raw_tensor(value, config.for_tensor(name)["fp16"])
               for name, value in job.state_dict.items()}
    act_quant = tuple(sorted(job.activation_quant, key=lambda q: q.module))
    gates = tuple(job.channel_gates)
    features = ({ACTIVATION_QUANT} if act_quant else set()) | (
        {CHANNEL_GATING} if gates else set())  # what the file holds needs

    act_scales, calibration = _calibrate(req, job.model, tensors, spec)
    data = DataSection(req.alignment)
    encoder = Encoder(data, req.coder)
    encoded = [encoder.tensor(name, t, config.for_tensor(name).get("coder"))
               for name, t in tensors.items()]
    architecture = _architecture_record(arch, spec, set(tensors), data)
    record = ModelRecord(
        producer=f"weightpack {__version__}", method=req.method,
        method_config_json=config.to_json(), source_sha256=checkpoint.sha256,
        architecture=architecture,
        input=spec, num_classes=num_classes, class_names=class_names,
        tensors=tuple(e.record for e in encoded), fp32_bytes=source_fp32_bytes,
        activation_scales=act_scales, calibration_json=calibration,
        required_features=tuple(sorted(features)), activation_quant=act_quant,
        channel_gates=gates,
    )
    with _own_output(req.output) as target:
        written = write_packed(target, record, data)
        with open_packed(target) as packed:
            _verify_round_trip(packed, tensors)
    report = size_report(record, written.preamble, written.index_raw_size, target)
    report["pack_seconds"] = round(time.perf_counter() - started, 3)
    report.update(method.extra_report(job))
    report["streams"] = {e.record.name: [vars(s) for s in e.streams] for e in encoded}
    return report


def _check_features(req: PackRequest, arch: ResolvedArchitecture,
                    features: frozenset[str]) -> None:
    """Refuse, before any work, a file whose required runtime features nothing could apply."""
    if CHANNEL_GATING in features and arch.kind != "builder":
        raise ConfigError(f"{req.method}: channel gating is applied by the runtime to zoo "
                          "architectures by module name; this model would be stored as an "
                          "ONNX graph, where it cannot be applied. Pack its state_dict with a "
                          "zoo --arch")
    if ACTIVATION_QUANT not in features:
        return
    if arch.kind != "builder":
        raise ConfigError(f"{req.method}: activation quantization (bits_a) is applied by the "
                          "runtime to zoo architectures by module name; this model would be "
                          "stored as an ONNX graph, where it cannot be applied. Pack its "
                          "state_dict with a zoo --arch, or leave bits_a unset")
    if req.calib_data is not None:
        raise ConfigError(f"{req.method}: --calib-data prepares int8 inference (the QDQ "
                          "graph), which cannot apply the model's own activation "
                          "quantization (bits_a); drop one of the two")


def _check_globs(config: MethodConfig, tensor_names: list[str], layers: list[str]) -> None:
    """A per-layer setting whose glob matches nothing would silently do nothing: refuse it,
    naming the Conv/Linear `layers` it could have meant (the closest, then first and last)."""
    unmatched = config.unmatched_globs(tensor_names)
    if not unmatched:
        return
    glob = unmatched[0]
    near = difflib.get_close_matches(glob, layers, n=3, cutoff=0.6)
    shown = list(dict.fromkeys([*near, *layers[:2], *layers[-2:]]))[:6]
    raise ConfigError(f"layer glob {glob!r} (from --set or --config) matches no layer of "
                      f"this model; its Conv/Linear layers are {', '.join(shown)}"
                      f"{', ...' if len(layers) > len(shown) else ''} ({len(layers)} in all)")


def _warn_unused_data(req: PackRequest, method: Method) -> None:
    if req.data is None or method.trains:
        return
    flag = {"cifar10": "--cifar10", "imagenet": "--imagenet"}.get(req.data.kind, "--data")
    warnings.warn(f"method {req.method} does not train: {flag} {req.data.root} gives the class "
                  f"names only (methods that train: "
                  f"{', '.join(n for n, m in METHODS.items() if m.trains)})",
                  UserWarning, stacklevel=3)


@contextlib.contextmanager
def _own_output(output: Path) -> Iterator[Path]:
    """Under torchrun every rank packs the same file; only rank 0 writes the user's path, the
    others write and check theirs in a scratch folder, so no two processes race on it."""
    if launch_rank() == 0:
        yield output
        return
    with tempfile.TemporaryDirectory(prefix="weightpack-rank") as scratch:
        yield Path(scratch) / output.name


def _calibrate(req: PackRequest, model: nn.Module, tensors: dict[str, CompressedTensor],
               spec: InputSpec) -> tuple[tuple[tuple[str, float], ...], str]:
    """Activation scales for 8-bit inference, measured on the weights being packed."""
    if req.calib_data is None:
        return (), ""
    # A copy of the packed module (zoo, graph or gated alike) holding the weights packed.
    module = copy.deepcopy(model)
    module.load_state_dict({n: t.dequantize() for n, t in tensors.items()})
    dataset = calibration_dataset(req.calib_data, spec)
    loader = make_loader(dataset, 64, req.workers, limit=min(req.calib_images, len(dataset)))
    scales = quant.calibrate(module, loader, method=req.calib_method)
    images = min(req.calib_images, len(dataset))
    return (tuple(sorted(scales.items())),
            quant.calibration_json(req.calib_method, images,
                                   99.99 if req.calib_method == "percentile" else None,
                                   data=req.calib_data.name))


def _architecture_record(arch: ResolvedArchitecture, spec: InputSpec, names: set[str],
                         data: DataSection) -> ArchitectureRecord:
    """A zoo builder, or the model's own ONNX graph with the packed weights taken out."""
    if arch.kind == "builder":
        return ArchitectureRecord("builder", arch.name, json.dumps(arch.kwargs, sort_keys=True))
    graph = export_module(arch.model, spec.shape)
    stored = {t.name for t in graph.graph.initializer} & names
    blob = weight_free(graph, stored).SerializeToString(deterministic=True)
    return ArchitectureRecord("onnx_graph", graph=data.add(blob))


def _num_classes(model: nn.Module, spec: InputSpec) -> int:
    """The width of the model's output on one input of the spec's shape: works for heads
    that are not a Linear (SqueezeNet's conv classifier) as well."""
    try:
        with torch.inference_mode():
            out = model.eval()(torch.zeros(1, *spec.shape))
    except RuntimeError as exc:
        raise ConfigError(f"the model does not run on inputs of shape {list(spec.shape)} "
                          f"({str(exc).splitlines()[0][:120]}); set --input-size") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise WeightpackError(f"the model returns {type(out).__name__} of shape "
                              f"{getattr(out, 'shape', '?')}, not (batch, classes) logits")
    return int(out.shape[1])


def _verify_round_trip(packed, tensors: dict[str, CompressedTensor]) -> None:
    """Decode what was written and demand bit-exact agreement with what was meant."""
    decoded = decode_state_dict(packed)
    for name, tensor in tensors.items():
        if not torch.equal(decoded[name], tensor.dequantize()):
            packed.path.unlink(missing_ok=True)
            raise WeightpackError(f"internal error: {name} does not survive the round trip")
