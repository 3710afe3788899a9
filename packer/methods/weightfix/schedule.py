"""What WFN and PWFN share around their fixing rounds: options checks, training data,
evaluation, per-iteration logs, iteration checkpoints, and the final report."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from packer.methods.base import CompressJob
from packer.methods.weightfix.fixed import FixedParams
from packer.training import (
    DataSpec,
    TrainConfig,
    TrainHooks,
    build_datasets,
    default_device,
    fit,
    rank,
)
from runtime.data import collate_skipping, make_loader
from runtime.errors import ConfigError, DataError
from runtime.evaluate import evaluate
from runtime.quant.weights import int8_weight
from runtime.tensors import CompressedTensor, ScalarCodebookTensor


def check_schedule(values: list[float], name: str) -> str | None:
    """A cumulative fixing schedule: strictly increasing fractions in (0, 1], ending at 1."""
    if not values:
        return f"{name} must not be empty"
    if any(not 0 < v <= 1 for v in values):
        return f"{name}: every fraction must be in (0, 1]"
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return f"{name} must be strictly increasing"
    if values[-1] != 1.0:
        return f"{name} must end at 1.0 (every weight fixed)"
    return None


def open_interval(lo: float, hi: float, what: str):
    return lambda v: None if lo < v < hi else f"{what} must be > {lo} and < {hi}"


def closed_interval(lo: float, hi: float, what: str):
    return lambda v: None if lo <= v <= hi else f"{what} must be between {lo} and {hi}"


def data_spec(job: CompressJob, method: str, needs_data: bool) -> DataSpec | None:
    data = job.data
    if data is not None and not isinstance(data, DataSpec):
        raise DataError(f"{method}: training data must be a packer.training.DataSpec, "
                        f"not {type(data).__name__}")
    if needs_data and data is None:
        no_training = "start_epochs=0 rest_epochs=0" if method == "pwfn" else "fixing_epochs=0"
        raise DataError(f"{method}: training between fixing steps needs data: pass "
                        f"--cifar10 DIR, --imagenet DIR or --data DIR, or set "
                        f"{no_training} for the post-training variant")
    return data


def fixable_names(job: CompressJob, include_bn: bool) -> list[str]:
    """Conv/Linear weights being compressed, their biases, and BatchNorm affine parameters
    when asked (WFN's bn_inc), in module order."""
    params = dict(job.model.named_parameters())
    targets = set(job.targets)
    names: list[str] = []
    for mod_name, module in job.model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if f"{prefix}weight" in targets:
            names.append(f"{prefix}weight")
            if f"{prefix}bias" in params and job.config.for_tensor(
                    f"{prefix}bias").get("method") != "none":
                names.append(f"{prefix}bias")
        elif include_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
            names += [f"{prefix}{p}" for p in ("weight", "bias") if f"{prefix}{p}" in params]
    if not names:
        raise ConfigError(f"{job.config.method}: the model has no Conv or Linear layer to fix")
    return names


@dataclass
class Evaluator:
    """Top-1 on the validation split (None without data), for the per-iteration log."""

    val_set: Dataset | None
    batch_size: int
    workers: int
    limit: int | None

    def __call__(self, model: nn.Module, progress: bool) -> float | None:
        if self.val_set is None:
            return None
        loader = make_loader(self.val_set, self.batch_size, self.workers, self.limit,
                             distributed=torch.distributed.is_available()
                             and torch.distributed.is_initialized())
        was_training = model.training
        result = evaluate(model, loader, default_device(), progress=progress)
        model.train(was_training)
        return result.top1


@torch.no_grad()
def recalibrate_bn(model: nn.Module, train_set: Dataset | None, images: int, batch_size: int,
                   workers: int, seed: int) -> bool:
    """Re-estimate BatchNorm running statistics on `images` training images (no gradient,
    no parameter change). Fixing moves weights, so the stored statistics go stale; the last
    step is not followed by training, so without this they stay stale in the packed file."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if train_set is None or images <= 0 or not norms:
        return False
    from packer.training import EpochSampler

    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, num_workers=workers,
        sampler=EpochSampler(len(train_set), images, seed),  # type: ignore[arg-type]
        collate_fn=collate_skipping)
    device = default_device()
    was_training = model.training
    model.to(device).eval()  # no dropout, no PWFN sampling: only BN in training mode
    for m in norms:
        m.train()
    for batch in loader:
        model(batch[0].to(device))
    model.train(was_training)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return True


def datasets(data: DataSpec | None) -> tuple[Dataset | None, Dataset | None]:
    return build_datasets(data) if data is not None else (None, None)


@dataclass
class IterationLog:
    """Per-iteration records, printed to stderr as they come (one line each, progress bars
    or not: long runs under nohup need them) and kept for the report."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if rank() == 0:
            top1 = record.get("top1")
            print(f"{self.method} {record['iteration']}/{record['iterations']}: "
                  f"fixed {100 * record['fixed_fraction']:.2f}%, "
                  f"{record['centres']} centres, entropy {record['entropy_bits']:.3f} b"
                  + (f", top-1 {top1:.2f}%" if top1 is not None else "")
                  + f" ({record['seconds']:.0f} s)", file=sys.stderr)


class IterationCheckpoint:
    """Model, fixed masks and log after each fixing iteration, for `resume`."""

    def __init__(self, path: str | None, job: CompressJob, fixed: FixedParams) -> None:
        self.path = Path(path) if path else None
        shapes = [[k, list(v.shape)] for k, v in job.model.state_dict().items()]
        options = {k: v for k, v in job.config.options.items()
                   if k not in ("resume", "checkpoint")}  # where from, not what
        doc = json.dumps({"options": options, "layers": job.config.layers, "seed": job.seed,
                          "shapes": shapes}, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(doc.encode()).hexdigest()
        self.fixed = fixed

    def save(self, model: nn.Module, iteration: int, log: IterationLog,
             extra: dict[str, Any] | None = None) -> None:
        if self.path is None or rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"fingerprint": self.fingerprint, "iteration": iteration,
                    "model": model.state_dict(), "fixed": self.fixed.state(),
                    "log": json.dumps(log.records), "extra": extra or {}}, tmp)
        os.replace(tmp, self.path)

    def load(self, model: nn.Module, log: IterationLog) -> tuple[int, dict[str, Any]]:
        """Restore the state after the last finished iteration; returns (iterations done,
        extra state)."""
        if self.path is None:
            raise ConfigError("resume=true needs checkpoint=PATH (the iteration checkpoint)")
        if not self.path.is_file():
            raise ConfigError(f"cannot resume: checkpoint {self.path} not found")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") != self.fingerprint:
                raise ConfigError(f"cannot resume from {self.path}: it was written for another "
                                  f"model, configuration or seed")
            model.load_state_dict(state["model"])
            self.fixed.load_state(state["fixed"])
        except ConfigError:
            raise
        except Exception as exc:  # damaged or foreign file
            raise ConfigError(f"cannot resume from {self.path}: "
                              f"{str(exc).splitlines()[0]}") from None
        log.records[:] = json.loads(state["log"])
        return int(state["iteration"]), dict(state.get("extra") or {})


def iteration_record(iteration: int, iterations: int, fixed: FixedParams,
                     top1: float | None, started: float, **extra: Any) -> dict[str, Any]:
    stats = fixed.stats()
    return {"iteration": iteration, "iterations": iterations,
            "fixed_fraction": round(fixed.fixed_fraction(), 6),
            "centres": int(fixed.centres().numel()), **stats, "top1": top1,
            "seconds": round(time.perf_counter() - started, 2), **extra}


def final_report(fixed: FixedParams, compressed: dict[str, ScalarCodebookTensor],
                 log: IterationLog, timings: dict[str, float]) -> dict[str, Any]:
    """unique values and entropy (both conventions), per-layer int8 exactness, the log."""
    int8_exact = {}
    for name, tensor in compressed.items():
        if name.endswith(".weight") and tensor.indices.dim() >= 2:
            int8_exact[name] = int8_weight(tensor.dequantize(), tensor).exact
    return {**fixed.stats(), "centres": int(fixed.centres().numel()),
            "fixable_parameters": fixed.numel,
            "int8_exact_layers": int8_exact,
            "int8_exact_count": f"{sum(int8_exact.values())}/{len(int8_exact)}",
            f"{log.method}_iterations": log.records, f"{log.method}_timings": timings}


class FixingRun:
    """The loop both methods share: per iteration, train (when asked), fix, re-evaluate, log
    and checkpoint; resume from the last finished iteration; hand the packer the result.
    Methods supply only their training configuration and their fixing step."""

    def __init__(self, job: CompressJob, method: str, fixed: FixedParams,
                 needs_data: bool) -> None:
        self.job, self.fixed = job, fixed
        self.data = data_spec(job, method, needs_data)
        self.train_set, val_set = datasets(self.data)
        self.batch_size = self.data.batch_size if self.data else 128
        self.workers = self.data.workers if self.data else 0
        opts = job.config.options
        self.evaluate = Evaluator(val_set, self.batch_size, self.workers,
                                  opts["val_limit"] or None)
        self.log = IterationLog(method)
        self.checkpoint = IterationCheckpoint(opts["checkpoint"], job, fixed)
        self.timings = {"training_s": 0.0, "fixing_s": 0.0, "evaluation_s": 0.0}

    def resume(self) -> int:
        """Iterations already done: 0, or those in the checkpoint with `resume=true`."""
        if not self.job.config.options["resume"]:
            return 0
        done, extra = self.checkpoint.load(self.job.model, self.log)
        self.timings.update(extra.get("timings", {}))
        return done

    def iteration(self, index: int, total: int, train: Callable[[], float | None] | None,
                  fix: Callable[[], dict[str, Any]]) -> None:
        """Run iteration `index` (0-based): `train` (None: no training), then `fix`, which
        returns the method's own fields for the log."""
        started = time.perf_counter()
        loss = None
        if train is not None and self.train_set is not None:
            before = time.perf_counter()
            loss = train()
            self.timings["training_s"] += time.perf_counter() - before
        before = time.perf_counter()
        fields = fix()
        self.timings["fixing_s"] += time.perf_counter() - before
        before = time.perf_counter()
        top1 = self.evaluate(self.job.model, self.job.progress)
        self.timings["evaluation_s"] += time.perf_counter() - before
        self.log.add(iteration_record(index + 1, total, self.fixed, top1, started, **fields,
                                      train_loss=loss))
        self.checkpoint.save(self.job.model, index + 1, self.log, {"timings": self.timings})

    def train(self, cfg: TrainConfig, hooks: TrainHooks) -> float | None:
        """One training phase of every parameter but the fixed entries (gradients masked,
        values re-projected after each step); returns the last epoch's training loss."""
        model = self.job.model
        for p in model.parameters():
            p.requires_grad_(True)
        project = hooks.after_step

        def after_step(m: nn.Module) -> None:
            if project is not None:
                project(m)
            self.fixed.project()

        self.fixed.freeze_fixed()
        try:
            result = fit(model, self.train_set, None, cfg,  # type: ignore[arg-type]
                         TrainHooks(loss=hooks.loss, after_step=after_step,
                                    before_eval=hooks.before_eval))
        finally:
            self.fixed.release()
            for p in model.parameters():
                p.requires_grad_(False)
        return result.history[-1]["train_loss"] if result.history else None

    def finish(self) -> tuple[dict[str, CompressedTensor], dict[str, Any]]:
        """The compressed tensors, with the packer's state dict updated to the trained values
        of everything else (BatchNorm, layers left out), and the report."""
        model = self.job.model
        model.cpu().eval()
        compressed = self.fixed.compressed()
        final = model.state_dict()
        for key in self.job.state_dict:
            self.job.state_dict[key] = final[key].detach().clone()
        report = final_report(self.fixed, compressed, self.log,
                              {k: round(v, 2) for k, v in self.timings.items()})
        return dict(compressed), report
