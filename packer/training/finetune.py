"""Fine-tuning a compressed model from the packer's standard training options, once for every
method that fine-tunes (PQF codebooks, low-bit QAT, ...): the `TrainConfig` built from the
options every such method declares (`lr`, `lr_min`, `train_limit`, `val_limit`, `checkpoint`,
`holdout`, `distill_temperature`), optional distillation against the uncompressed model, and
the report's `validated_on` line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from packer.training.data import DataSpec
from packer.training.loop import TrainConfig, TrainHooks, fit

Loss = Callable[[nn.Module, Tensor, Tensor], Tensor]


def distillation_loss(teacher: nn.Module, temperature: float) -> Loss:
    """KL(teacher || student) at `temperature`, scaled by T^2: the compressed model learns the
    original's whole output distribution, more signal per image than one label (as in BGD)."""
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        del targets
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            soft = torch.softmax(teacher(images) / temperature, dim=1)
        log_p = torch.log_softmax(net(images) / temperature, dim=1)
        return torch.nn.functional.kl_div(log_p, soft, reduction="batchmean") * temperature**2

    return loss


def validated_on(holdout: int) -> str:
    """Which split chose the best epoch, in words for the report."""
    return f"{holdout} held-out train images" if holdout else "the test/val split"


def finetune(job: Any, epochs: int, data: DataSpec, train_set: Any, val_set: Any,
             teacher: nn.Module | None, *, after_step: Callable[[nn.Module], None] | None = None,
             train_all: bool = True, **config: Any) -> dict[str, Any]:
    """Train `job.model` for `epochs` with the method's standard options; `config` overrides
    or adds `TrainConfig` fields (e.g. `weight_decay`, `optimizer`). With `train_all` every
    parameter trains (codes and masks are buffers, so they stay); without it the method has
    chosen what trains (`requires_grad`). `after_step` re-imposes what a step must not change
    (a pruning mask, a fixed zero centroid). Returns the fit's report plus `validated_on`."""
    opts: Mapping[str, Any] = job.config.options
    model = job.model
    if train_all:
        for p in model.parameters():
            p.requires_grad_(True)
    settings: dict[str, Any] = dict(
        epochs=epochs, lr=opts["lr"], lr_min=opts["lr_min"], batch_size=data.batch_size,
        workers=data.workers, train_limit=opts["train_limit"] or None,
        val_limit=opts["val_limit"] or None, seed=job.seed, checkpoint=opts["checkpoint"],
        progress=job.progress, method_settings=job.settings())
    settings.update(config)
    hooks = TrainHooks(loss=distillation_loss(teacher, opts["distill_temperature"])
                       if teacher is not None else None, after_step=after_step)
    result = fit(model, train_set, val_set, TrainConfig(**settings), hooks)
    if train_all:
        for p in model.parameters():
            p.requires_grad_(False)
    return {**result.as_dict(), "validated_on": validated_on(opts["holdout"])}
