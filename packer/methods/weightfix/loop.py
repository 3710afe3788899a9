"""The fixing loop WFN and PWFN share: per round, train (when asked), fix, re-evaluate, log
and checkpoint; resume from the last finished round; hand the packer the result.

Methods supply only their training configuration and their fixing step; training, validation,
BatchNorm recalibration and checkpoint files are the training package's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from packer.methods.base import CompressJob
from packer.methods.weightfix.fixed import FixedParams
from packer.methods.weightfix.report import IterationLog, final_report, iteration_record
from packer.training import (
    Checkpoint,
    DataSpec,
    TrainConfig,
    TrainHooks,
    Validation,
    build_datasets,
    fit,
    model_signature,
    training_data,
)
from runtime.distributed import local_device
from runtime.errors import ConfigError, DataError
from runtime.tensors import CompressedTensor


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


def _data(job: CompressJob, method: str, needs_data: bool) -> DataSpec | None:
    data = training_data(job.data, method)
    if needs_data and data is None:
        no_training = "start_epochs=0 rest_epochs=0" if method == "pwfn" else "fixing_epochs=0"
        raise DataError(f"{method}: training between fixing steps needs data: pass "
                        f"--cifar10 DIR, --imagenet DIR or --data DIR, or set "
                        f"{no_training} for the post-training variant")
    return data


class FixingRun:
    """One WFN or PWFN run: its data, validation, log, checkpoint and timings."""

    def __init__(self, job: CompressJob, method: str, fixed: FixedParams,
                 needs_data: bool) -> None:
        self.job, self.fixed = job, fixed
        self.data = _data(job, method, needs_data)
        self.train_set, val_set = build_datasets(self.data) if self.data else (None, None)
        self.batch_size = self.data.batch_size if self.data else 128
        self.workers = self.data.workers if self.data else 0
        opts = job.config.options
        self.validation = Validation(val_set, self.batch_size, self.workers,
                                     opts["val_limit"] or None)
        self.log = IterationLog(method)
        self.checkpoint = Checkpoint(opts["checkpoint"],
                                     {"model": model_signature(job.model), **job.settings()})
        self.timings = {"training_s": 0.0, "fixing_s": 0.0, "evaluation_s": 0.0}

    def resume(self) -> int:
        """Iterations already done: 0, or those in the checkpoint with `resume=true`."""
        if not self.job.config.options["resume"]:
            return 0
        if self.checkpoint.path is None:
            raise ConfigError("resume=true needs checkpoint=PATH (the iteration checkpoint)")
        state = self.checkpoint.load()
        try:
            self.job.model.load_state_dict(state["model"])
            self.fixed.load_state(state["fixed"])
            records = json.loads(state["log"])
            done = int(state["iteration"])
        except Exception as exc:  # a damaged file that still carries the right settings
            raise ConfigError(f"cannot resume from {self.checkpoint.path}: "
                              f"{str(exc).splitlines()[0]}") from None
        self.log.records[:] = records
        self.timings.update(dict(state.get("extra") or {}).get("timings", {}))
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
        top1 = self.validation.top1(self.job.model, local_device(), self.job.progress)
        self.timings["evaluation_s"] += time.perf_counter() - before
        self.log.add(iteration_record(index + 1, total, self.fixed, top1, started, **fields,
                                      train_loss=loss))
        self.checkpoint.save({"iteration": index + 1, "model": self.job.model.state_dict(),
                              "fixed": self.fixed.state(), "log": json.dumps(self.log.records),
                              "extra": {"timings": self.timings}})

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
        self.job.model.cpu().eval()
        compressed = self.fixed.compressed()
        self.job.take_model_state()
        report = final_report(self.fixed, compressed, self.log,
                              {k: round(v, 2) for k, v in self.timings.items()})
        return dict(compressed), report
