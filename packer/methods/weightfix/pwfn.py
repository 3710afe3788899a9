"""`pwfn`: Probabilistic Weight Fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

Every Conv/Linear weight and bias gets a mean (the trained value) and a learned noise scale
sigma; training samples w = mu + sigma * eps and pushes sigma up where the loss tolerates
noise. Each round then fixes weights to the power-of-two sum that the most weights tolerate
within h standard deviations, so noise-tolerant weights move far and sensitive ones stay
put (METHODS.md section 2). Fixed weights stay fixed and their sigma is frozen (the
reference kept pushing fixed sigmas and decaying fixed means until the next round).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from packer.config import Option, closed_interval
from packer.methods.base import CompressJob, Method
from packer.methods.weightfix.bayes import (
    Gaussian,
    attach,
    detach_all,
    mean_parameter,
    sigma_gradient_hook,
)
from packer.methods.weightfix.fixed import FixedParams
from packer.methods.weightfix.loop import FixingRun, fixable_names
from packer.methods.weightfix.options import RUN_OPTIONS, check_epochs, check_schedule
from packer.methods.weightfix.zscore import SIGMA_JOINS, cluster_round
from packer.training import TrainConfig, TrainHooks
from runtime.distributed import world_size
from runtime.tensors import CompressedTensor

ROUNDS = [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0]
START_FRACTION = 0.05  # round 0 trains on 5% of the training images, as the reference


class PWFNMethod(Method):
    name = "pwfn"
    chain_rank = 2
    trains = True
    summary = "probabilistic weight fixing: learned sigmas decide which power of two (PWFN)"
    options = {
        "lr": Option(1e-3, "SGD learning rate (momentum 0.9, weight decay 1e-4)", float,
                     check=closed_interval(1e-9, 10.0, "lr"), per_layer=False),
        "start_epochs": Option(1, "round-0 epochs (on 5% of the training images)", int,
                               check=check_epochs, per_layer=False),
        "rest_epochs": Option(3, "epochs before each later round (0 with start_epochs=0: "
                              "post-training, no data needed)", int, check=check_epochs,
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
        **RUN_OPTIONS,
    }

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        opts = job.config.options
        rounds = list(opts["rounds"])
        model = job.model
        names = fixable_names(job, include_bn=False)
        gaussians = self._attach(model, names, opts["prior"])
        means = {n: mean_parameter(model.get_submodule(n.rsplit(".", 1)[0]),
                                   n.rsplit(".", 1)[1]) for n in names}
        run = FixingRun(job, self.name, FixedParams(model, names, means),
                        opts["start_epochs"] > 0 or opts["rest_epochs"] > 0)
        h_schedule = np.linspace(opts["start_sigma"], opts["end_sigma"], len(rounds))
        for i in range(run.resume(), len(rounds)):
            epochs = opts["start_epochs"] if i == 0 else opts["rest_epochs"]
            train = partial(self._train, run, gaussians, epochs, i) if epochs else None
            run.iteration(i, len(rounds), train, partial(
                self._fix, run, gaussians, names, rounds[i], float(h_schedule[i])))
        model.cpu().eval()
        sigma_median = float(torch.cat([g.sigma.detach().float().cpu().reshape(-1)
                                        for g in gaussians.values()]).median())
        detach_all(model)
        compressed, self.report = run.finish()
        self.report["sigma_median"] = sigma_median
        return compressed

    def _fix(self, run: FixingRun, gaussians: dict[str, Gaussian], names: list[str],
             fraction: float, h: float) -> dict[str, Any]:
        opts = run.job.config.options
        fixed = run.fixed
        sigma = torch.cat([gaussians[n].sigma.detach().float().cpu().reshape(-1)
                           for n in names])
        result = cluster_round(fixed.flat_values(), sigma, fixed.flat_fixed(), fraction,
                               opts["b"], h, opts["inc"], opts["zero_fix"], opts["sigma_join"])
        fixed.set_fixed(result.values, result.fixed)
        self._set_sigma(gaussians, names, result.sigma)
        return {"target": fraction, "h": round(h, 4), "final_h": round(result.final_h, 4),
                "final_terms": result.final_terms, "newly_fixed": result.newly_fixed,
                "centres_chosen": result.centres_chosen}

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

    def _train(self, run: FixingRun, gaussians: dict[str, Gaussian], epochs: int,
               index: int) -> float | None:
        job = run.job
        opts = job.config.options
        limit = opts["train_limit"] or len(run.train_set)  # type: ignore[arg-type]
        if index == 0:  # 5% of the images, but at least one batch per process
            limit = min(limit, max(run.batch_size * world_size(),
                                   int(START_FRACTION * len(run.train_set))))  # type: ignore[arg-type]
        reg = opts["reg"] if opts["reg_function"] == "linear" else 0.0
        frozen = opts["sigma_join"] != "allow_retraining"
        entries = {e.name: e for e in run.fixed.entries}
        for gaussian in gaussians.values():
            gaussian.sigma.requires_grad_(True)  # hooks need it; run.train sets the rest
        handles = [gaussian.sigma.register_hook(sigma_gradient_hook(
            gaussian, reg if name.endswith(".weight") else 0.0,
            (lambda e=entries[name]: e.fixed) if frozen else (lambda: None)))
            for name, gaussian in gaussians.items()]
        cfg = TrainConfig(epochs=epochs, lr=opts["lr"], lr_min=opts["lr"], weight_decay=1e-4,
                          optimizer="sgd", batch_size=run.batch_size, workers=run.workers,
                          train_limit=limit, seed=job.seed * 1009 + index,
                          progress=job.progress, grad_clip=opts["grad_clip"] or None)
        try:
            return run.train(cfg, TrainHooks())
        finally:
            for handle in handles:
                handle.remove()
