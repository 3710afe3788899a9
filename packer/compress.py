"""The packing pipeline: checkpoint -> method -> entropy coding -> packed file -> report."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import sys
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
from packer.checkpoint import Checkpoint, load_checkpoint
from packer.class_names import class_names_for
from packer.config import MethodConfig, collect_settings, load_config_file
from packer.encode import DataSection, EncodedTensor, Encoder
from packer.methods import METHODS, CompressJob, Method, resolve_method
from packer.methods.none import raw_tensor
from packer.ptq.budget import (
    BudgetGoal,
    cache_key,
    check_method,
    encoded_bytes,
    fit_drop,
    fit_size,
    measure_layers,
    with_rates,
)
from packer.ptq.calib import CalibrationSet, load_calibration
from packer.ptq.flags import REPAIRS
from packer.ptq.repair import repair
from packer.writer import layout, write_packed
from runtime import quant, zoo
from runtime.atomic import check_output
from runtime.data import calibration_root
from runtime.decode import decode_state_dict
from runtime.distributed import launch_rank
from runtime.errors import ConfigError, DataError, WeightpackError
from runtime.format.features import ACTIVATION_QUANT, CHANNEL_GATING, features_held
from runtime.format.preamble import DEFAULT_ALIGNMENT
from runtime.format.reader import open_packed
from runtime.format.records import ActivationQuantRecord, ArchitectureRecord, InputSpec, ModelRecord
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
    calib_data: Path | None = None  # calibration images: int8 activation scales, repair,
    calib_images: int = 512  # budgets' sensitivity, AdaRound (packer.ptq)
    calib_method: str = "percentile"
    workers: int = 2
    class_names_file: Path | None = None  # one class name per line (else from the data folder)
    target_size: int | None = None  # a size budget in bytes (packer.ptq.budget)
    target_ratio: float | None = None  # ... or as a compression ratio vs fp32
    max_drop: float | None = None  # ... or the smallest file within this top-1 loss
    calib_holdout: int = 2000  # held-out calibration images --max-drop measures on
    sensitivity: str = "fisher"  # per-layer sensitivity measure (fisher or kl)
    repair: tuple[str, ...] | None = None  # data-aware repairs; None: all (with calib data)
    budget_cache: dict | None = None  # candidates and sensitivities kept across packs


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
    user can get wrong (output path, options, checkpoint, names, calibration images) is
    checked before the method's work starts, which may be hours of training."""
    check_output(req.output)
    started = time.perf_counter()
    ctx = _context(req)
    budget_report = None
    if ctx.goal is not None:
        built, budget_report = _budgeted(ctx)
    else:
        built = _build(ctx, ctx.config)
    with _own_output(req.output) as target:
        written = write_packed(target, built.record, built.data)
        with open_packed(target) as packed:
            _verify_round_trip(packed, built.tensors)
    report = size_report(built.record, written.preamble, written.index_raw_size, target)
    report["pack_seconds"] = round(time.perf_counter() - started, 3)
    report.update(built.method.extra_report(built.job))
    report.update(built.extra)
    if budget_report is not None:
        report["budget"] = budget_report
    if ctx.calib is not None:
        report["calibration"] = _calibration_cost(ctx, report)
    report["streams"] = {e.record.name: [vars(s) for s in e.streams] for e in built.encoded}
    return report


def _calibration_cost(ctx: _Context, report: dict[str, Any]) -> dict[str, Any]:
    """Images and seconds spent on calibration data, summed over every build."""
    assert ctx.calib is not None
    seconds = {"load": round(ctx.calib.seconds, 2)}
    if "budget" in report:
        seconds["sensitivity"] = report["budget"]["sensitivity"]["seconds"]
    seconds.update({k: round(v, 2) for k, v in ctx.spent.items()})
    seconds["total"] = round(sum(seconds.values()), 2)
    return {**ctx.calib.report(), "builds": ctx.builds, "seconds": seconds}


@dataclass
class _Context:
    """What every build of one request shares (a budget builds several)."""

    req: PackRequest
    config: MethodConfig
    checkpoint: Checkpoint
    arch: ResolvedArchitecture
    targets: list[str]
    spec: InputSpec
    num_classes: int
    class_names: tuple[str, ...]
    calib: CalibrationSet | None
    repairs: tuple[str, ...]
    goal: BudgetGoal | None
    spent: dict[str, float] = field(default_factory=dict)  # calibration seconds by step
    builds: int = 0


@dataclass
class _Built:
    """One complete packed file in memory: the records, the data and how it was made."""

    record: ModelRecord
    data: DataSection
    tensors: dict[str, CompressedTensor]
    encoded: list[EncodedTensor]
    method: Method
    job: CompressJob
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return layout(self.record, self.data).preamble.file_size

    def layer_bytes(self, name: str) -> int:
        for e in self.encoded:
            if e.record.name == name:
                return encoded_bytes(e)
        raise KeyError(name)


def _context(req: PackRequest) -> _Context:
    """Check the request and load everything a build needs, cheapest checks first."""
    method = resolve_method(req.method)
    asked = _budget_flag(req)
    if asked:
        check_method(method, req.method, asked)
        if req.calib_data is None:
            raise ConfigError(f"{asked} needs --calib-data DIR: each layer's sensitivity is "
                              f"measured on calibration images (a few hundred from train/)")
    repairs = tuple(req.repair) if req.repair is not None else REPAIRS
    if unknown := set(repairs) - set(REPAIRS):
        raise ConfigError(f"unknown repair {sorted(unknown)[0]!r}; choose from "
                          f"{', '.join(REPAIRS)} (or none)")
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
    calib = None
    if req.calib_data is not None:
        if req.calib_images < 1:
            raise ConfigError("--calib-images must be at least 1")
        calibration_root(req.calib_data)  # the folder exists, or one line now, not after hours
        calib = load_calibration(req.calib_data, spec, req.calib_images,
                                 req.calib_holdout if req.max_drop is not None else 0,
                                 req.seed)
    class_names = class_names_for(req.class_names_file, req.data, req.calib_data, num_classes)
    goal = None
    if asked:
        size = req.target_size
        if req.target_ratio is not None:
            size = int(_fp32_bytes(state_dict) / req.target_ratio)
        goal = BudgetGoal(size, req.max_drop, asked)
    return _Context(req, config, checkpoint, arch, targets, spec, num_classes, class_names,
                    calib, repairs, goal)


def _budget_flag(req: PackRequest) -> str:
    """The budget flag the user gave ('' for none); more than one is an error."""
    given = [f for f, v in (("--target-size", req.target_size),
                            ("--target-ratio", req.target_ratio),
                            ("--max-drop", req.max_drop)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of {' and '.join(given)}, not both")
    if req.target_size is not None and req.target_size < 1:
        raise ConfigError("--target-size must be a positive number of bytes")
    if req.target_ratio is not None and not req.target_ratio > 0:
        raise ConfigError("--target-ratio must be positive")
    if req.max_drop is not None and not req.max_drop >= 0:
        raise ConfigError("--max-drop must be zero or more points")
    if given == ["--target-size"]:
        return f"--target-size {req.target_size}"
    if given == ["--target-ratio"]:
        return f"--target-ratio {req.target_ratio}"
    return f"--max-drop {req.max_drop}" if given else ""


def _fresh_job(ctx: _Context, config: MethodConfig) -> CompressJob:
    """A job over a scratch copy of the source model (methods may change it in place)."""
    model = copy.deepcopy(ctx.arch.model)
    return CompressJob(model, model.state_dict(), ctx.targets, config, ctx.req.seed,
                       ctx.req.progress, ctx.req.data, ctx.calib)


def _build(ctx: _Context, config: MethodConfig) -> _Built:
    """Compress, repair, encode: one whole file in memory."""
    torch.manual_seed(ctx.req.seed)
    job = _fresh_job(ctx, config)
    method = resolve_method(ctx.req.method)
    compressed: dict[str, CompressedTensor] = method.compress(job)
    ctx.builds += 1
    extra: dict[str, Any] = {}
    learned = method.extra_report(job).get("adaround_seconds")
    if learned is not None:
        ctx.spent["adaround"] = ctx.spent.get("adaround", 0.0) + learned
    if ctx.calib is not None and ctx.repairs and method.post_training(job):
        reference = method.reference_model() or ctx.arch.model
        extra["repair"] = repair(job.model, reference, job.state_dict, compressed,
                                 list(ctx.calib.batches()), ctx.repairs)
        ctx.spent["repair"] = ctx.spent.get("repair", 0.0) + extra["repair"]["seconds"]
    act_quant = tuple(sorted(job.activation_quant, key=lambda q: q.module))
    built = _assemble(ctx, config, job.state_dict, compressed, act_quant, method, job)
    built.extra = extra
    return built


def _assemble(ctx: _Context, config: MethodConfig, state_dict: dict[str, torch.Tensor],
              compressed: dict[str, CompressedTensor],
              act_quant: tuple[ActivationQuantRecord, ...], method: Method,
              job: CompressJob) -> _Built:
    """Records and data of a file holding `compressed` and the rest of `state_dict` raw."""
    req = ctx.req
    tensors = {name: compressed.get(name) or raw_tensor(value, config.for_tensor(name)["fp16"])
               for name, value in state_dict.items()}
    gates = tuple(job.channel_gates)  # a stage may have added gates (fbs) to the model
    act_scales, calibration = _calibrate(ctx, job.model, tensors)
    data = DataSection(req.alignment)
    encoder = Encoder(data, req.coder)
    encoder.plan(tensors, lambda name: config.for_tensor(name).get("coder"))
    encoded = [encoder.tensor(name, t, config.for_tensor(name).get("coder"))
               for name, t in tensors.items()]
    features = features_held((e.record for e in encoded), act_quant, gates)
    architecture = _architecture_record(ctx.arch, ctx.spec, set(tensors), data)
    record = ModelRecord(
        producer=f"weightpack {__version__}", method=req.method,
        method_config_json=config.to_json(), source_sha256=ctx.checkpoint.sha256,
        architecture=architecture,
        input=ctx.spec, num_classes=ctx.num_classes, class_names=ctx.class_names,
        tensors=tuple(e.record for e in encoded),
        fp32_bytes=_fp32_bytes(ctx.arch.model.state_dict()),  # the source alone (not fbs gates)
        activation_scales=act_scales, calibration_json=calibration,
        required_features=tuple(sorted(features)), activation_quant=act_quant,
        channel_gates=gates,
    )
    return _Built(record, data, tensors, encoded, method, job)


def _budgeted(ctx: _Context) -> tuple[_Built, dict[str, Any]]:
    """Choose each layer's rate for the size budget or the accuracy drop (packer.ptq.budget)."""
    req, goal = ctx.req, ctx.goal
    assert goal is not None and ctx.calib is not None
    job = _fresh_job(ctx, ctx.config)
    probe_method = resolve_method(req.method)
    option = probe_method.knob(ctx.config)
    key = cache_key(ctx.checkpoint.sha256, req.method, probe_method.candidate_key(ctx.config),
                    ctx.calib.fingerprint, req.sensitivity, req.coder, req.alignment, req.seed)
    measured = measure_layers(
        probe_method, job, req.sensitivity,
        lambda n: ctx.config.for_tensor(n).get("coder") or req.coder,
        req.alignment, req.budget_cache, key)
    probe = _assemble(ctx, ctx.config, job.state_dict, measured.lowest, (), probe_method,
                      job).size

    def build(rates: dict[str, float | None]) -> _Built:
        return _build(ctx, with_rates(ctx.config, option, rates))

    def say(line: str) -> None:
        if req.progress:
            print(line, file=sys.stderr)

    if goal.size is not None:
        built, report = fit_size(measured.layers, goal.size, probe, build, option, say)
    else:
        assert goal.max_drop is not None and ctx.calib.holdout is not None
        baseline = _holdout_top1(ctx, ctx.arch.model)
        built, report = fit_drop(measured.layers, goal.max_drop, probe, build,
                                 lambda b: _holdout_top1(ctx, _decoded_model(ctx, b)),
                                 baseline, option, say)
    report = {"asked": goal.asked, "option": option, **report,
              "sensitivity": measured.report}
    return built, report


def _decoded_model(ctx: _Context, built: _Built) -> nn.Module:
    module = copy.deepcopy(ctx.arch.model)
    module.load_state_dict({n: t.dequantize() for n, t in built.tensors.items()})
    return module.eval()


@torch.no_grad()
def _holdout_top1(ctx: _Context, model: nn.Module) -> float:
    """Top-1 (%) on the held-out calibration split (labels: the folder's class order)."""
    assert ctx.calib is not None and ctx.calib.holdout is not None
    model.eval()
    correct = 0
    for start in range(0, ctx.calib.holdout.shape[0], 256):
        images = ctx.calib.holdout[start:start + 256]
        labels = ctx.calib.holdout_labels[start:start + 256]
        correct += int((model(images).argmax(1) == labels).sum())
    return 100.0 * correct / ctx.calib.holdout.shape[0]


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


def _calibrate(ctx: _Context, model: nn.Module, tensors: dict[str, CompressedTensor]
               ) -> tuple[tuple[tuple[str, float], ...], str]:
    """Activation scales for 8-bit inference, measured on the weights being packed."""
    req = ctx.req
    if ctx.calib is None:
        return (), ""
    # A copy of the packed module (zoo, graph or gated alike) holding the weights packed.
    module = copy.deepcopy(model)
    module.load_state_dict({n: t.dequantize() for n, t in tensors.items()})
    scales = quant.calibrate(module, ctx.calib.batches(64), method=req.calib_method)
    images = int(ctx.calib.images.shape[0])
    return (tuple(sorted(scales.items())),
            quant.calibration_json(req.calib_method, images,
                                   99.99 if req.calib_method == "percentile" else None,
                                   data=req.calib_data.name if req.calib_data else ""))


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
