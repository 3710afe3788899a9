"""`pwfn`: Probabilistic Weight Fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

Every Conv/Linear weight and bias gets a mean (the trained value) and a learned noise scale
sigma; training samples w = mu + sigma * eps and pushes sigma up where the loss tolerates
noise. Each round then fixes weights to the power-of-two sum that the most weights tolerate
within h standard deviations, so noise-tolerant weights move far and sensitive ones stay
put (METHODS.md section 2). Fixed weights stay fixed and their sigma is frozen (the
reference kept pushing fixed sigmas and decaying fixed means until the next round).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from packer.config import Option
from packer.methods.base import CompressJob, Method
from packer.methods.weightfix.bayes import (
    Gaussian,
    attach,
    detach_all,
    mean_parameter,
    sigma_gradient_hook,
)
from packer.methods.weightfix.fixed import FixedParams
from packer.methods.weightfix.schedule import (
    Evaluator,
    IterationCheckpoint,
    IterationLog,
    check_schedule,
    closed_interval,
    data_spec,
    datasets,
    final_report,
    fixable_names,
    iteration_record,
)
from packer.methods.weightfix.zscore import SIGMA_JOINS, cluster_round
from packer.training import TrainConfig, TrainHooks, fit, world_size
from runtime.tensors import CompressedTensor

ROUNDS = [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0]
START_FRACTION = 0.05  # round 0 trains on 5% of the training images, as the reference


def _epochs(v: int) -> str | None:
    return None if 0 <= v <= 1000 else "epochs must be between 0 and 1000"


class PWFNMethod(Method):
    name = "pwfn"
    summary = "probabilistic weight fixing: learned sigmas decide which power of two (PWFN)"
    options = {
        "lr": Option(1e-3, "SGD learning rate (momentum 0.9, weight decay 1e-4)", float,
                     check=closed_interval(1e-9, 10.0, "lr"), per_layer=False),
        "start_epochs": Option(1, "round-0 epochs (on 5% of the training images)", int,
                               check=_epochs, per_layer=False),
        "rest_epochs": Option(3, "epochs before each later round (0 with start_epochs=0: "
                              "post-training, no data needed)", int, check=_epochs,
                              per_layer=False),
        "rounds": Option(ROUNDS, "cumulative fraction fixed after each round", list,
                         check=lambda v: check_schedule(v, "rounds"), per_layer=False),
        "reg": Option(2.0 ** -11, "strength of the sigma prior's push toward 0.05", float,
                      check=closed_interval(0.0, 10.0, "reg"), per_layer=False),
        "reg_function": Option("linear", "sigma prior: linear (the paper's) or none", str,
                               choices=("linear", "none"), per_layer=False),
        "b": Option(7, "smallest power of two is 2^-b; |mu| < 2^-b may join 0 (zero_fix)",
                    int, check=closed_interval(1, 30, "b"), per_layer=False),
        "start_sigma": Option(1.0, "h (tolerance in standard deviations) at the first round",
                              float, check=closed_interval(1e-3, 100.0, "start_sigma"),
                              per_layer=False),
        "end_sigma": Option(1.0, "h at the last round (linear in between)", float,
                            check=closed_interval(1e-3, 100.0, "end_sigma"), per_layer=False),
        "inc": Option(2.0, "factor h grows by when no candidate fits", float,
                      check=closed_interval(1.01, 100.0, "inc"), per_layer=False),
        "zero_fix": Option(True, "weights below 2^-b may always join 0", bool,
                           per_layer=False),
        "prior": Option(True, "sigma initialised from the distance to the nearest powers of "
                        "two (false: a constant 1e-4)", bool, per_layer=False),
        "sigma_join": Option("std_mu", "sigma of newly fixed weights", str,
                             choices=SIGMA_JOINS, per_layer=False),
        "grad_clip": Option(1.0, "gradient norm clip (0: off)", float,
                            check=closed_interval(0.0, 1e6, "grad_clip"), per_layer=False),
        "train_limit": Option(0, "training images per epoch, drawn at random (0: all)", int,
                              check=closed_interval(0, 10**9, "train_limit"), per_layer=False),
        "val_limit": Option(0, "validation images for the per-round log (0: all)", int,
                            check=closed_interval(0, 10**9, "val_limit"), per_layer=False),
        "checkpoint": Option(None, "round checkpoint file, written after every round", str,
                             per_layer=False),
        "resume": Option(False, "continue from `checkpoint`", bool, per_layer=False),
    }

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        return dict(self.report)

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        opts = job.config.options
        rounds = list(opts["rounds"])
        trains = opts["start_epochs"] > 0 or opts["rest_epochs"] > 0
        data = data_spec(job, self.name, trains)
        train_set, val_set = datasets(data)
        model = job.model
        names = fixable_names(job, include_bn=False)
        gaussians = self._attach(model, names, opts["prior"])
        means = {n: mean_parameter(model.get_submodule(n.rsplit(".", 1)[0]),
                                   n.rsplit(".", 1)[1]) for n in names}
        fixed = FixedParams(model, names, means)
        evaluate = Evaluator(val_set, data.batch_size if data else 128,
                             data.workers if data else 0, opts["val_limit"] or None)
        log = IterationLog(self.name)
        checkpoint = IterationCheckpoint(opts["checkpoint"], job, fixed)
        timings = {"training_s": 0.0, "fixing_s": 0.0, "evaluation_s": 0.0}
        h_schedule = np.linspace(opts["start_sigma"], opts["end_sigma"], len(rounds))

        done = 0
        if opts["resume"]:
            done, extra = checkpoint.load(model, log)
            timings.update(extra.get("timings", {}))
        for i in range(done, len(rounds)):
            started = time.perf_counter()
            epochs = opts["start_epochs"] if i == 0 else opts["rest_epochs"]
            loss = None
            if epochs > 0 and train_set is not None:
                before = time.perf_counter()
                limit = opts["train_limit"] or len(train_set)  # type: ignore[arg-type]
                if i == 0:  # 5% of the images, but at least one batch per process
                    floor = data.batch_size * world_size()  # type: ignore[union-attr]
                    limit = min(limit, max(floor, int(START_FRACTION * len(train_set))))  # type: ignore[arg-type]
                loss = self._train(job, model, fixed, gaussians, train_set, epochs, limit, i)
                timings["training_s"] += time.perf_counter() - before
            before = time.perf_counter()
            sigma = torch.cat([gaussians[n].sigma.detach().float().cpu().reshape(-1)
                               for n in names])
            result = cluster_round(fixed.flat_values(), sigma, fixed.flat_fixed(), rounds[i],
                                   opts["b"], float(h_schedule[i]), opts["inc"],
                                   opts["zero_fix"], opts["sigma_join"])
            fixed.set_fixed(result.values, result.fixed)
            self._set_sigma(gaussians, names, result.sigma)
            timings["fixing_s"] += time.perf_counter() - before
            before = time.perf_counter()
            top1 = evaluate(model, job.progress)
            timings["evaluation_s"] += time.perf_counter() - before
            log.add(iteration_record(
                i + 1, len(rounds), fixed, top1, started, target=rounds[i],
                h=round(float(h_schedule[i]), 4), final_h=round(result.final_h, 4),
                final_terms=result.final_terms, newly_fixed=result.newly_fixed,
                centres_chosen=result.centres_chosen, train_loss=loss))
            checkpoint.save(model, i + 1, log, {"timings": timings})

        model.cpu().eval()
        sigmas = {n: gaussians[n].sigma.detach().float().cpu() for n in names}
        detach_all(model)
        compressed = fixed.compressed()
        final = model.state_dict()
        for key in job.state_dict:  # trained BN and any layer left out of fixing
            job.state_dict[key] = final[key].detach().clone()
        self.report = final_report(fixed, compressed, log,
                                   {k: round(v, 2) for k, v in timings.items()})
        self.report["sigma_median"] = float(torch.cat([s.reshape(-1) for s in sigmas.values()])
                                            .median())
        return dict(compressed)

    @staticmethod
    def _attach(model: nn.Module, names: list[str], prior: bool) -> dict[str, Gaussian]:
        out = {}
        for name in names:
            module_name, _, attr = name.rpartition(".")
            out[name] = attach(model.get_submodule(module_name), attr, prior)
        return out

    @staticmethod
    @torch.no_grad()
    def _set_sigma(gaussians: dict[str, Gaussian], names: list[str], flat: torch.Tensor) -> None:
        offset = 0
        for name in names:
            sigma = gaussians[name].sigma
            n = sigma.numel()
            sigma.copy_(flat[offset:offset + n].reshape(sigma.shape).to(sigma.device))
            offset += n

    def _train(self, job: CompressJob, model: nn.Module, fixed: FixedParams,
               gaussians: dict[str, Gaussian], train_set: Any, epochs: int, limit: int,
               index: int) -> float | None:
        opts = job.config.options
        data = job.data
        for p in model.parameters():
            p.requires_grad_(True)
        reg = opts["reg"] if opts["reg_function"] == "linear" else 0.0
        frozen = opts["sigma_join"] != "allow_retraining"
        masks = {e.name: e for e in fixed.entries}
        handles = []
        for name, gaussian in gaussians.items():
            entry = masks[name]
            handles.append(gaussian.sigma.register_hook(sigma_gradient_hook(
                gaussian, reg if name.endswith(".weight") else 0.0,
                (lambda e=entry: e.fixed) if frozen else (lambda: None))))
        cfg = TrainConfig(epochs=epochs, lr=opts["lr"], lr_min=opts["lr"], weight_decay=1e-4,
                          optimizer="sgd", batch_size=data.batch_size, workers=data.workers,
                          train_limit=limit, seed=job.seed * 1009 + index,
                          progress=job.progress, grad_clip=opts["grad_clip"] or None)
        fixed.freeze_fixed()
        try:
            result = fit(model, train_set, None, cfg,
                         TrainHooks(after_step=lambda _m: fixed.project()))
        finally:
            fixed.release()
            for handle in handles:
                handle.remove()
        for p in model.parameters():
            p.requires_grad_(False)
        return result.history[-1]["train_loss"] if result.history else None
