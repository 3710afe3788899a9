"""The project's one training loop: fine-tune whatever a method left trainable.

A method makes a model whose trainable parameters are exactly what it wants trained (PQF:
codebooks, biases, BatchNorm, uncompressed layers; WFN: every weight not yet fixed) and calls
`fit`. The loop owns everything else: Adam or SGD with a per-batch cosine schedule, shuffled
loading, validation after every epoch with the best state kept, progress bars and per-epoch
log lines, a resumable checkpoint, and DistributedDataParallel under `torchrun` (gradients
averaged by DDP, training data sharded, loss and accuracy summed across ranks).

How a method plugs in (PQF, WFN and PWFN do; pruning, TTQ/BWN/DoReFa and FBS are meant to):

- `TrainHooks.loss(net, images, targets) -> loss`: the objective (default cross-entropy), e.g.
  distillation, a regulariser, a sparsity or gate penalty. `net` may be the DDP wrapper.
- `TrainHooks.after_step(model)`: runs after every optimiser step, e.g. re-project weights to a
  grid, re-apply a pruning mask, clamp a learned threshold.
- `TrainHooks.before_eval(model)`: runs before every validation, e.g. freeze a mask or switch
  gates to their deterministic form.
- Resume: set `TrainConfig.checkpoint`; the state is written after every epoch and a later
  `fit` with the same settings continues from it. Put the method's own settings in
  `TrainConfig.method_settings` (`CompressJob.settings()`): the checkpoint is refused, naming
  what changed, when they, the training configuration or the model's tensors differ. State a
  method keeps outside the model's `state_dict` is not saved, so keep masks, scales and gates
  as buffers or parameters.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from packer.training.checkpoint import Checkpoint, model_signature
from packer.training.validation import Validation
from runtime.data import ShardSampler, collate_skipping
from runtime.distributed import init_distributed, local_device, rank, world_size
from runtime.errors import ConfigError, DataError

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """How to train. `lr` is per process; like the reference it is multiplied by the number
    of processes under torchrun (the global batch grows with it)."""

    epochs: int
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    batch_size: int = 128
    workers: int = 2
    train_limit: int | None = None  # images drawn (fresh, at random) per epoch; None: all
    val_limit: int | None = None  # validation images (spread evenly); None: all
    seed: int = 0
    checkpoint: Path | None = None  # written after every epoch; resumed from when present
    device: str | None = None  # None: the local CUDA device when there is one, else CPU
    progress: bool = True
    max_batches: int | None = None  # cap on batches per epoch (tests, smoke runs)
    scale_lr_by_world: bool = True
    optimizer: str = "adam"  # "adam", or "sgd" (momentum 0.9)
    grad_clip: float | None = None  # max gradient norm (WFN clips at 0.5); None: no clipping
    log_epochs: bool = True  # one line per epoch on stderr (rank 0), with or without a terminal
    # The calling method's settings (CompressJob.settings()): a checkpoint written under other
    # method settings is not resumed from.
    method_settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, not {self.epochs}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, not {self.optimizer!r}")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= lr_min <= lr ({self.lr}, {self.lr_min})")

    def settings(self) -> dict[str, Any]:
        """The fields that decide what training computes (not where or how fast it runs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _RUN_ONLY_FIELDS}


_RUN_ONLY_FIELDS = ("checkpoint", "device", "progress", "log_epochs", "workers",
                    "method_settings")


@dataclass
class TrainHooks:
    """Method-specific steps; the defaults are plain cross-entropy classification."""

    loss: LossFn | None = None  # (model, images, targets) -> scalar loss
    after_step: Callable[[nn.Module], None] | None = None  # e.g. project weights to a grid
    before_eval: Callable[[nn.Module], None] | None = None


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int  # 0: the starting state (nothing beat it)
    best_top1: float | None
    start_top1: float | None
    resumed_from: int  # epochs already done in the checkpoint resumed from (0: fresh)
    seconds: float
    world_size: int
    history: list[dict[str, float]] = field(default_factory=list)
    threads: int = 1  # torch intra-op threads per process (per-epoch speed is in history)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checkpoint(model: nn.Module, cfg: TrainConfig, steps: int, world: int) -> Checkpoint:
    return Checkpoint(cfg.checkpoint, {
        "model": model_signature(model), "training": cfg.settings(),
        "steps_per_epoch": steps, "processes": world, "method": dict(cfg.method_settings)})


# --- the loop -------------------------------------------------------------------------------


def _cross_entropy(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(images), targets)


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig,
        hooks: TrainHooks | None = None) -> TrainResult:
    """Train `model`'s trainable parameters in place; on return it holds the best state."""
    hooks = hooks or TrainHooks()
    started = time.perf_counter()
    init_distributed()
    world, me = world_size(), rank()
    device = torch.device(cfg.device) if cfg.device else local_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameter")
    sampler = ShardSampler(len(train_set), me, world, seed=cfg.seed,  # type: ignore[arg-type]
                           limit=cfg.train_limit)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.workers, collate_fn=collate_skipping,
                              drop_last=world > 1, pin_memory=device.type == "cuda",
                              persistent_workers=cfg.workers > 0)
    validation = Validation(val_set, cfg.batch_size, cfg.workers, cfg.val_limit)
    steps = len(train_loader) if cfg.max_batches is None else min(cfg.max_batches,
                                                                    len(train_loader))
    if steps == 0:
        raise DataError(f"fewer training images ({len(sampler)}) than one batch per process")
    lr = cfg.lr * (world if cfg.scale_lr_by_world else 1)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, cfg.epochs * steps), eta_min=cfg.lr_min)
    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    loss_fn = hooks.loss or _cross_entropy
    show = cfg.progress and me == 0 and sys.stderr.isatty()

    start_epoch, history = 0, []
    best_state: dict[str, Tensor] | None = None
    best_top1: float | None = None
    best_epoch = 0
    checkpoint = _checkpoint(model, cfg, steps, world)
    if checkpoint.exists():
        state = checkpoint.load()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        best_state, best_top1 = state["best_state"], state["best_top1"]
        best_epoch, start_top1 = int(state["best_epoch"]), state["start_top1"]
    else:
        start_top1 = validation.top1(model, device, show, hooks.before_eval)
        best_top1 = start_top1
        best_state = copy.deepcopy(model.state_dict())

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        epoch_started = time.perf_counter()
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        bar = tqdm(train_loader, total=steps, desc=f"train {epoch + 1}/{cfg.epochs}",
                   unit="batch", file=sys.stderr, disable=not show, leave=False)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            images, targets = batch[0].to(device), batch[1].to(device)
            if targets.numel() == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net, images, targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DataError(f"training diverged (loss {value}) in epoch {epoch + 1}; "
                                f"lower lr")
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if hooks.after_step is not None:
                hooks.after_step(model)
            sums[0] += value * targets.numel()
            sums[2] += targets.numel()
            if show:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        train_s = time.perf_counter() - epoch_started
        top1 = validation.top1(model, device, show, hooks.before_eval)
        record = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[2].clamp_min(1)),
                  "images": int(sums[2]), "top1": top1 if top1 is not None else math.nan,
                  "train_s": round(train_s, 2),
                  "images_per_s": round(float(sums[2]) / max(train_s, 1e-9), 1)}
        history.append(record)
        if top1 is None or best_top1 is None or top1 > best_top1:
            best_top1, best_epoch = top1, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        if me == 0 and cfg.log_epochs:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}"
                  + (f", top-1 {top1:.2f}%" if top1 is not None else "")
                  + f" ({record['images_per_s']:.0f} images/s)", file=sys.stderr, flush=True)
        checkpoint.save({
            "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "history": history, "best_state": best_state, "best_top1": best_top1,
            "best_epoch": best_epoch, "start_top1": start_top1})
        if world > 1:
            dist.barrier()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(epochs_run=cfg.epochs - start_epoch, best_epoch=best_epoch,
                       best_top1=best_top1, start_top1=start_top1, resumed_from=start_epoch,
                       seconds=round(time.perf_counter() - started, 2), world_size=world,
                       history=history, threads=torch.get_num_threads())
