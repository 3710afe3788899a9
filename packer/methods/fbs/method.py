"""`fbs`: Feature Boosting and Suppression (Gao et al., ICLR 2019), channel gating that the
runtime executes per image. It saves compute, not bytes: chain it with a weight method
(`fbs+kmeans`, `fbs+uniform`, `fbs+int8`) for a file that is small as well.

Every gated convolution gets a saliency predictor (runtime.gating: s = |Linear(mean_hw
|x|)|, keep the top k = round(C_out * ratio) per image, kept channels scaled by s). The
gates start as the reference leaves them (nn.Linear's default initialisation) or, by default
when training, fitted to each channel's response with saliency ~1 (calibrate.py), and the
whole model trains through the shared loop (`packer.training.fit`) in stages whose keep ratio
anneals from `ratio_start` in steps of `ratio_step` down to `ratio` (the reference's
0.9 -> 0.7 -> 0.5), each stage a fresh Adam, with an L1 penalty on the saliencies. The
packed file holds the predictors as tensors and one gating record per conv (feature
"channel_gating", format 1.2). See docs/FBS.md.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from packer.config import MethodConfig, Option, closed_interval
from packer.methods.base import CompressJob, Method, refuse_torchscript
from packer.methods.fbs.calibrate import fit_predictors
from packer.methods.lowbit.method import COMMON_OPTIONS as TRAINING_OPTIONS
from packer.training import (
    DataSpec,
    TrainConfig,
    TrainHooks,
    build_datasets,
    distillation_loss,
    epochs_to_run,
    fit,
    training_data,
)
from packer.training.finetune import validated_on
from runtime.data import make_loader
from runtime.errors import ConfigError, DataError
from runtime.format.features import CHANNEL_GATING
from runtime.format.records import ChannelGateRecord
from runtime.gating import GATE_CHILD, ChannelGate, apply_gates, gates_of, keep_count
from runtime.tensors import CompressedTensor

DEFAULT_EPOCHS_WITH_DATA = 2
GATE_SETTINGS = ("auto", "on", "off")
INIT_CHOICES = ("auto", "reference", "calibrated")
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _ratio_ok(what: str):
    return lambda v: None if 0 < v <= 1 else f"{what} must be in (0, 1], not {v}"



def stage_ratios(ratio: float, start: float, step: float) -> list[float]:
    """The keep ratio of each training stage: start, start - step, ... while above `ratio`,
    then `ratio` (0.5 from 0.9 in steps of 0.2: 0.9, 0.7, 0.5)."""
    ratios: list[float] = []
    current = start
    while current > ratio + 1e-9:
        ratios.append(round(current, 6))
        current -= step
    return [*ratios, ratio]


def _auto_gated(name: str, conv: nn.Conv2d, first: str) -> bool:
    """The default set: every 3x3 convolution and every downsample convolution, except the
    model's first convolution (the stem reads the image) and grouped convolutions."""
    square3 = tuple(conv.kernel_size) == (3, 3)
    return name != first and conv.groups == 1 and (square3 or "downsample" in name)


def select_gates(model: nn.Module, config: MethodConfig) -> list[str]:
    """Names of the convolutions to gate, in module order, from the per-layer `gate`
    setting (auto, on, off); refuses settings that ask to gate anything else."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    for glob, values in config.layers:
        if values.get("gate") != "on":
            continue
        matched = [n for n in layers if fnmatch.fnmatchcase(n, glob)
                   or fnmatch.fnmatchcase(f"{n}.weight", glob)]
        wrong = [n for n in matched if not isinstance(layers[n], nn.Conv2d)]
        if wrong:
            raise ConfigError(f"{glob}.gate=on: {wrong[0]} is a {type(layers[wrong[0]]).__name__}"
                              ", not a convolution; fbs gates Conv2d layers only")
        if not any(isinstance(layers[n], nn.Conv2d) for n in matched):
            more = ", ..." if len(convs) > 4 else ""
            raise ConfigError(f"{glob}.gate=on matches no convolution of the model "
                              f"(convolutions: {', '.join(convs[:4])}{more})")
        grouped = [n for n in matched if layers[n].groups != 1]
        if grouped:
            raise ConfigError(f"{glob}.gate=on: {grouped[0]} is a grouped convolution "
                              f"(groups={layers[grouped[0]].groups}), which fbs does not gate")
    chosen = []
    for name in convs:
        setting = config.for_tensor(f"{name}.weight")["gate"]
        if setting == "on" or setting == "auto" and _auto_gated(name, layers[name], convs[0]):
            chosen.append(name)
    if not chosen:
        raise ConfigError("fbs: no convolution is gated (set GLOB.gate=on for some)")
    return chosen


class FBSMethod(Method):
    name = "fbs"
    summary = "Feature Boosting and Suppression: per-image channel gating (saves MACs)"
    chain_rank = 0
    changes_model = True
    trains = True
    options: ClassVar[dict[str, Option]] = {
        "ratio": Option(0.5, "fraction of its output channels each gated conv keeps per image, "
                        "in (0, 1]: k = round(C_out * ratio)", float,
                        check=_ratio_ok("ratio"), per_layer=False),
        "ratio_start": Option(0.9, "keep ratio of the first training stage", float,
                              check=_ratio_ok("ratio_start"), per_layer=False),
        "ratio_step": Option(0.2, "each stage lowers the ratio by this down to `ratio` "
                             "(0.9, 0.7, 0.5: the reference's schedule)", float,
                             check=closed_interval(0.01, 1.0, "ratio_step"), per_layer=False),
        "epochs": Option(None, f"training epochs per stage (default: {DEFAULT_EPOCHS_WITH_DATA}"
                         " with training data, 0 without; 0 = gate without training)", int,
                         check=closed_interval(0, 1000, "epochs"), per_layer=False),
        "final_epochs": Option(None, "epochs of the last stage (default: epochs)", int,
                               check=closed_interval(0, 1000, "final_epochs"), per_layer=False),
        "l1": Option(1e-8, "L1 penalty on the saliencies (the reference's 1e-8), per image",
                     float, check=closed_interval(0.0, 1.0, "l1"), per_layer=False),
        "gate": Option("auto", "per layer: auto (every 3x3 and downsample conv but the first "
                       "conv), on, off", str, choices=GATE_SETTINGS),
        "lr": replace(TRAINING_OPTIONS["lr"], help="peak learning rate of each stage; cosine "
                      "decay to lr_min, stepped per batch"),
        **{k: TRAINING_OPTIONS[k] for k in ("lr_min", "optimizer", "weight_decay", "distill",
                                            "distill_temperature", "train_limit", "val_limit",
                                            "holdout")},
        "init": Option("auto", "predictor start: reference (nn.Linear's default, as the "
                       "reference code), calibrated (fitted by least squares to each channel's "
                       "response on training images, saliency ~1; see docs/FBS.md), auto "
                       "(calibrated when training, reference with epochs=0)", str,
                       choices=INIT_CHOICES, per_layer=False),
        "init_scale": Option(0.01, "calibrated init: s = |1 + init_scale (W p + b)|, how far "
                             "the fitted response moves the start from 1", float,
                             check=closed_interval(1e-6, 10.0, "init_scale"), per_layer=False),
        "calibration_images": Option(1024, "calibrated init: training images it is fitted "
                                     "on", int, check=closed_interval(16, 1_000_000,
                                                               "calibration_images"),
                                     per_layer=False),
        "checkpoint": Option(None, "training checkpoint prefix: stage i is written to and "
                             "resumed from PREFIX.ratios-0.9-...-r_i.epochs-e_0-...-e_i (runs "
                             "sharing a prefix of the schedule share those stages)", str,
                             per_layer=False),
    }

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def required_features(self, config: MethodConfig) -> frozenset[str]:
        return frozenset({CHANNEL_GATING})

    def added_tensors(self, model: nn.Module, config: MethodConfig) -> list[str]:
        if isinstance(model, torch.jit.ScriptModule):
            return []  # refused by compress, with the reason
        return [f"{name}.{GATE_CHILD}.{p}" for name in select_gates(model, config)
                for p in ("weight", "bias")]

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        return dict(self.report)

    def _check(self, job: CompressJob) -> tuple[int, int, DataSpec | None]:
        refuse_torchscript(job.model, self.name, "gates the model's convolutions")
        data = training_data(job.data, self.name)
        opts = job.config.options
        epochs = epochs_to_run(opts["epochs"], data, self.name, "epochs",
                               DEFAULT_EPOCHS_WITH_DATA, "gate without training")
        final = (epochs if opts["final_epochs"] is None else
                 epochs_to_run(opts["final_epochs"], data, self.name, "final_epochs", epochs,
                               "gate without training"))
        return epochs, final, data

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        epochs, final_epochs, data = self._check(job)
        opts = job.config.options
        names = select_gates(job.model, job.config)
        ratios = stage_ratios(opts["ratio"], opts["ratio_start"], opts["ratio_step"])
        stage_epochs = [epochs] * (len(ratios) - 1) + [final_epochs]
        teacher = (copy.deepcopy(job.model).eval()
                   if opts["distill"] and any(stage_epochs) else None)
        convs = {n: job.model.get_submodule(n) for n in names}
        init = opts["init"]
        if init == "auto":
            init = "calibrated" if any(stage_epochs) else "reference"
        if init == "calibrated" and data is None:
            raise DataError("fbs: init=calibrated fits the predictors on training images: "
                            "pass --cifar10 DIR, --imagenet DIR or --data DIR")
        train_set, val_set = (build_datasets(data, opts["holdout"], job.seed)
                              if data is not None and (any(stage_epochs) or init == "calibrated")
                              else (None, None))
        fitted = (_calibrated(job, names, train_set, data) if init == "calibrated" else {})
        records = [ChannelGateRecord(n, keep_count(c.out_channels, ratios[0]))
                   for n, c in convs.items()]
        generator = torch.Generator().manual_seed(job.seed)
        model = apply_gates(job.model, records, generator)
        gates = gates_of(model)
        with torch.no_grad():
            for name, (weight, bias) in fitted.items():
                gates[name].weight.copy_(weight)
                gates[name].bias.copy_(bias)
        stages = []
        for i, (ratio, stage_epochs_i) in enumerate(zip(ratios, stage_epochs, strict=True)):
            _set_keep(gates, convs, ratio)
            stage: dict[str, Any] = {"ratio": ratio, "epochs": stage_epochs_i}
            if stage_epochs_i > 0:
                checkpoint = (Path(stage_checkpoint(opts["checkpoint"], ratios[:i + 1],
                                                    stage_epochs[:i + 1]))
                              if opts["checkpoint"] else None)
                settings = _stage_settings(job, ratios[:i + 1], stage_epochs[:i + 1])
                stage["training"] = self._train(job, model, gates, stage_epochs_i, data,
                                                train_set, val_set, teacher, checkpoint,
                                                settings)
            stages.append(stage)
        for gate in gates.values():
            gate.last_saliency = None
        model.cpu().eval()

        compress_predictors = [f"{n}.{GATE_CHILD}.weight" for n in names
                               if job.config.for_tensor(f"{n}.{GATE_CHILD}.weight").get(
                                   "method") != "none"]
        job.replace_model(model, compress_predictors)
        job.channel_gates[:] = [ChannelGateRecord(n, gates[n].keep) for n in names]
        self.report = {
            "fbs_init": init,
            "fbs_gates": {n: {"keep": gates[n].keep, "channels": convs[n].out_channels}
                          for n in names},
            "fbs_schedule": stages,
            "fbs_predictor_parameters": sum(g.weight.numel() + g.bias.numel()
                                            for g in gates.values()),
        }
        return {}

    def _train(self, job: CompressJob, model: nn.Module, gates: dict[str, ChannelGate],
               epochs: int, data: DataSpec, train_set: Any, val_set: Any,
               teacher: nn.Module | None, checkpoint: Path | None,
               settings: dict[str, Any]) -> dict[str, Any]:
        opts = job.config.options
        for p in model.parameters():
            p.requires_grad_(True)
        cfg = TrainConfig(epochs=epochs, lr=opts["lr"], lr_min=opts["lr_min"],
                          weight_decay=opts["weight_decay"], optimizer=opts["optimizer"],
                          batch_size=data.batch_size, workers=data.workers,
                          train_limit=opts["train_limit"] or None,
                          val_limit=opts["val_limit"] or None, seed=job.seed,
                          checkpoint=checkpoint, progress=job.progress,
                          method_settings=settings)
        base = (distillation_loss(teacher, opts["distill_temperature"]) if teacher is not None
                else _cross_entropy)
        hooks = TrainHooks(loss=_with_saliency_penalty(base, list(gates.values()), opts["l1"]))
        result = fit(model, train_set, val_set, cfg, hooks)
        for p in model.parameters():
            p.requires_grad_(False)
        return {**result.as_dict(), "validated_on": validated_on(opts["holdout"]),
                "schedule": f"{opts['optimizer']}, lr {opts['lr']:g} cosine to "
                            f"{opts['lr_min']:g} per batch over {epochs} epochs"}


STAGE_INDEPENDENT = ("ratio", "epochs", "final_epochs")
"""Options whose effect on stage i is in its schedule prefix (ratios and epochs so far)."""


def stage_checkpoint(prefix: str, ratios: list[float], epochs: list[int]) -> str:
    """Stage i's checkpoint file: named by the schedule up to it, ratios and epochs, so runs
    that share a prefix share its stages and schedules of other lengths do not collide."""
    return (f"{prefix}.ratios-" + "-".join(f"{r:g}" for r in ratios)
            + ".epochs-" + "-".join(str(e) for e in epochs))


def _stage_settings(job: CompressJob, ratios: list[float], epochs: list[int]) -> dict[str, Any]:
    """What decides stage i's result, for its resume checkpoint: the job's settings with the
    final ratio and epoch counts replaced by the schedule up to this stage, so runs sharing a
    prefix of the schedule (ratio 0.5 after 0.7; fbs and fbs+kmeans) share its stages."""
    settings = job.settings()
    options = {k: v for k, v in settings["options"].items() if k not in STAGE_INDEPENDENT}
    return {**settings, "method": "fbs", "options": options, "stage_ratios": ratios,
            "stage_epochs": epochs}


def _calibrated(job: CompressJob, names: list[str], train_set: Any,
                data: DataSpec) -> dict[str, tuple[Tensor, Tensor]]:
    """The fitted predictors (calibrate.fit_predictors) on `calibration_images` images spread
    over the training split (never the held-out ones), in this process with a forked,
    seeded RNG: the augmentation draws, and so the file, depend on the seed alone."""
    opts = job.config.options
    loader = make_loader(train_set, data.batch_size, 0,
                         limit=min(opts["calibration_images"], len(train_set)))
    with torch.random.fork_rng():
        torch.manual_seed(job.seed)
        return fit_predictors(job.model, names, (batch[0] for batch in loader),
                              opts["init_scale"])


def _set_keep(gates: dict[str, ChannelGate], convs: dict[str, nn.Conv2d], ratio: float) -> None:
    for name, gate in gates.items():
        gate.keep = keep_count(convs[name].out_channels, ratio)


def _cross_entropy(net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(net(images), targets)


def _with_saliency_penalty(base, gates: list[ChannelGate], l1: float):
    """The loss plus l1 x (sum of every gate's saliencies) per image."""
    def loss(net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        value = base(net, images, targets)
        if l1 > 0:
            penalty = sum(g.last_saliency.sum() for g in gates if g.last_saliency is not None)
            value = value + l1 * penalty / images.shape[0]
        return value
    return loss
