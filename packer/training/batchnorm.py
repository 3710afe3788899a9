"""Re-estimating BatchNorm statistics after weights moved without training."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from runtime.data import ShardSampler, collate_skipping
from runtime.distributed import local_device


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, train_set: Dataset | None, images: int,
                          batch_size: int, workers: int, seed: int) -> bool:
    """Re-estimate BatchNorm running statistics on `images` training images (a seeded draw; no
    gradient, no parameter change); returns whether anything was recalibrated.

    A method that moves weights (fixing, pruning) leaves the stored statistics stale; when no
    training follows the last move, they would stay stale in the packed file.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if train_set is None or images <= 0 or not norms:
        return False
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    loader = DataLoader(
        train_set, batch_size=batch_size, num_workers=workers,
        sampler=ShardSampler(len(train_set), seed=seed, limit=images),  # type: ignore[arg-type]
        collate_fn=collate_skipping)
    device = local_device()
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
