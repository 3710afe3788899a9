"""`wfn`: Weight Fixing Networks (Subia-Waud & Dasmahapatra, ECCV 2022).

Iteratively fix a growing fraction of all Conv/Linear weights and biases (network-wide) to 0
or short sums of powers of two, training the rest in between with a regulariser that pulls
them toward the centres already chosen (METHODS.md section 1). The allowed distance shrinks
from N*delta at the first step to delta at the last, as the reference code does. Unlike the
reference, fixed weights stay fixed (set `refix` to re-cluster everything every step), and
the result is a real file: one codebook (the values used) + entropy-coded indices per tensor.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from packer.config import Option, closed_interval, open_interval
from packer.methods.base import CompressJob, Method
from packer.methods.weightfix.fixed import FixedParams
from packer.methods.weightfix.greedy import fix_step
from packer.methods.weightfix.loop import FixingRun, fixable_names
from packer.methods.weightfix.options import RUN_OPTIONS, check_epochs, check_schedule
from packer.methods.weightfix.regulariser import cluster_distance, regularised_loss
from packer.training import TrainConfig, TrainHooks, recalibrate_batchnorm
from runtime.tensors import CompressedTensor

log = logging.getLogger(__name__)

PERCENTAGES = [0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0]
NO_DATA_WARNING = (
    "wfn post-training (fixing_epochs=0) without data cannot re-estimate BatchNorm "
    "statistics after fixing, and stale statistics cost accuracy (ResNet-20, 5,000 held-out "
    "CIFAR-10 training images, 96.90% unfixed: 95.80% at distance_allowed=0.0075 and 13.66% "
    "at 0.02; ResNet-56 at 0.02: 30.5% instead of 89.50%); pass --calib-data DIR (a few "
    "hundred training images) to re-estimate them (ResNet-20: 96.36% and 43.56%; at 0.02 "
    "the fixing itself needs retraining, fixing_epochs > 0)")


class WFNMethod(Method):
    name = "wfn"
    chain_rank = 2
    trains = True
    summary = "weight fixing to powers of two, network-wide, with retraining (WFN)"
    options = {
        "distance_allowed": Option(0.0075, "delta: allowed mean distance to a centre at the "
                                   "last step (the first uses N*delta)", float,
                                   check=open_interval(0.0, 1.0, "distance_allowed"),
                                   per_layer=False),
        "calculation_type": Option("relative", "distance |w-c|/|w| (relative) or |w-c|",
                                   str, choices=("relative", "euclidean"), per_layer=False),
        "percentages": Option(PERCENTAGES, "cumulative fraction fixed after each iteration",
                              list, check=lambda v: check_schedule(v, "percentages"),
                              per_layer=False),
        "first_epoch": Option(0, "training epochs before the first fixing step", int,
                              check=check_epochs, per_layer=False),
        "fixing_epochs": Option(3, "training epochs after each fixing step but the last "
                                "(0: post-training fixing, no data needed)", int,
                                check=check_epochs, per_layer=False),
        "zero_distance": Option(2.0 ** -7, "gamma0: |w| below this joins the 0 centre", float,
                                check=open_interval(0.0, 1.0, "zero_distance"),
                                per_layer=False),
        "regularisation_ratio": Option(0.4, "gamma: the regulariser's weight relative to "
                                       "the cross-entropy", float,
                                       check=closed_interval(0.0, 100.0,
                                                             "regularisation_ratio"),
                                       per_layer=False),
        "bn_inc": Option(False, "also fix BatchNorm weight and bias", bool, per_layer=False),
        "optimizer": Option("adam", "adam (no weight decay) or sgd (momentum 0.9, weight "
                            "decay 5e-4)", str, choices=("adam", "sgd"), per_layer=False),
        "lr": Option(2e-5, "learning rate", float, check=closed_interval(1e-9, 10.0, "lr"),
                     per_layer=False),
        "scheduler": Option("none", "none (constant lr) or cosine (to lr/100 per phase)", str,
                            choices=("none", "cosine"), per_layer=False),
        "grad_clip": Option(0.5, "gradient norm clip (0: off)", float,
                            check=closed_interval(0.0, 1e6, "grad_clip"), per_layer=False),
        "refix": Option(False, "re-cluster already fixed weights every step (the reference's "
                        "behaviour)", bool, per_layer=False),
        "bn_recalibration": Option(2048, "training images to re-estimate BatchNorm statistics "
                                   "on after each fixing step (0: off; needs data)", int,
                                   check=closed_interval(0, 10**7, "bn_recalibration"),
                                   per_layer=False),
        **RUN_OPTIONS,
    }

    def post_training(self, job: CompressJob) -> bool:
        opts = job.config.options
        return not (opts["fixing_epochs"] > 0 and len(opts["percentages"]) > 1
                    or opts["first_epoch"] > 0)

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        opts = job.config.options
        schedule = list(opts["percentages"])
        trains = not self.post_training(job)
        if not trains and job.data is None and job.calib is None:
            log.warning(NO_DATA_WARNING)
        fixed = FixedParams(job.model, fixable_names(job, opts["bn_inc"]))
        run = FixingRun(job, self.name, fixed, trains)
        n = len(schedule)
        for t in range(run.resume(), n):
            epochs = opts["first_epoch"] if t == 0 else opts["fixing_epochs"]
            train = partial(self._train, run, epochs, t) if epochs else None
            run.iteration(t, n, train, partial(self._fix, run, schedule, t))
        compressed, self.report = run.finish()
        return compressed

    def _fix(self, run: FixingRun, schedule: list[float], t: int) -> dict[str, Any]:
        opts = run.job.config.options
        fixed = run.fixed
        distance = opts["distance_allowed"] * max(1, len(schedule) - t)
        if opts["refix"]:
            fixed.set_fixed(fixed.flat_values(), torch.zeros(fixed.numel, dtype=torch.bool))
        result = fix_step(fixed.flat_values(), fixed.flat_fixed(), schedule[t], distance,
                          opts["calculation_type"] == "relative", opts["zero_distance"])
        fixed.set_fixed(result.values, result.fixed)
        recalibrate_batchnorm(run.job.model, run.train_set, opts["bn_recalibration"],
                              run.batch_size, run.workers, run.job.seed + t)
        return {"target": schedule[t], "distance": round(distance, 6),
                "newly_fixed": result.newly_fixed, "max_order": result.max_order,
                "mean_distance": round(result.distance_mean, 6)}

    def _train(self, run: FixingRun, epochs: int, iteration: int) -> float | None:
        job, fixed = run.job, run.fixed
        opts = job.config.options
        centres = fixed.centres()
        relative = opts["calculation_type"] == "relative"
        gamma = opts["regularisation_ratio"] if centres.numel() else 0.0

        def loss(net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
            ce = nn.functional.cross_entropy(net(images), targets)
            if gamma <= 0:
                return ce
            r = cluster_distance(fixed.free_values(), centres, relative, opts["zero_distance"])
            return regularised_loss(ce, r, gamma)

        lr = opts["lr"]
        cfg = TrainConfig(epochs=epochs, lr=lr,
                          lr_min=lr / 100 if opts["scheduler"] == "cosine" else lr,
                          weight_decay=5e-4 if opts["optimizer"] == "sgd" else 0.0,
                          optimizer=opts["optimizer"], batch_size=run.batch_size,
                          workers=run.workers, train_limit=opts["train_limit"] or None,
                          seed=job.seed * 1009 + iteration, progress=job.progress,
                          grad_clip=opts["grad_clip"] or None)
        return run.train(cfg, TrainHooks(loss=loss))
