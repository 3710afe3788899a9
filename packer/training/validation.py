"""Top-1 on a validation split during training: what picks the best epoch in `fit` and what
the weight-fixing methods log after every round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from runtime.data import make_loader
from runtime.distributed import is_distributed
from runtime.evaluate import evaluate


@dataclass
class Validation:
    """A validation split and how to load it; None as the split means "no validation".

    Under torchrun each process evaluates its shard and the counts are summed.
    """

    dataset: Dataset | None
    batch_size: int
    workers: int
    limit: int | None = None  # images, spread evenly over the split; None: all

    def top1(self, model: nn.Module, device: torch.device, progress: bool,
             before_eval: Callable[[nn.Module], None] | None = None) -> float | None:
        """Top-1 in percent (None without a split); the model's train/eval mode is kept."""
        if self.dataset is None:
            return None
        if before_eval is not None:
            before_eval(model)
        loader = make_loader(self.dataset, self.batch_size, self.workers, self.limit,
                             distributed=is_distributed())
        was_training = model.training
        result = evaluate(model, loader, device, progress=progress)
        model.train(was_training)
        return result.top1
