"""Top-1/top-5 accuracy of a model over a loader, on one process or summed over many.

Correct counts are accumulated on the device and read once at the end, so the loop never
waits on the accelerator per batch. When torch.distributed is initialised the counts are
summed over all processes (give each its shard with ``make_loader(distributed=True)``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from runtime.distributed import is_distributed, rank
from runtime.errors import ArchitectureError, DataError

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracies in percent; ``images`` counts evaluated images, ``skipped`` unreadable ones."""

    top1: float
    top5: float
    images: int
    seconds: float
    images_per_s: float
    skipped: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unpack(batch: Any) -> tuple[Tensor, Tensor, int]:
    """Accept :class:`runtime.data.Batch` as well as plain ``(images, targets)`` pairs."""
    if not isinstance(batch, list | tuple) or len(batch) not in (2, 3):
        raise DataError(f"a loader batch must be (images, targets[, skipped]), got {type(batch)}")
    skipped = int(batch[2]) if len(batch) == 3 else 0
    return batch[0], batch[1], skipped


def _count(
    model: Callable[[Tensor], Tensor], loader: Iterable[Any], device: torch.device, show: bool
) -> Tensor:
    """``[top-1 correct, top-5 correct, images, skipped]`` over the loader, on ``device``."""
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    for batch in tqdm(loader, desc="eval", unit="batch", file=sys.stderr, disable=not show):
        images, targets, skipped = _unpack(batch)
        counts[3] += skipped
        if targets.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ArchitectureError("the model must return a (batch, classes) tensor")
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets.unsqueeze(1))
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum() if k == 5 else hits[:, 0].sum()
        counts[2] += targets.numel()
    return counts


def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Run ``model`` over ``loader`` and report top-1/top-5 accuracy and throughput.

    An ``nn.Module`` is put in eval mode and moved to ``device``. With fewer than 5 classes
    top-5 is meaningless (always 100 %), so it is reported equal to top-1. ``seconds`` is the
    wall time of the whole loop, data loading included.
    """
    device = torch.device(device)
    if isinstance(model, nn.Module):
        model = model.eval().to(device)
    show = progress and rank() == 0 and sys.stderr.isatty()
    start = time.perf_counter()
    with torch.inference_mode():
        counts = _count(model, loader, device, show)
        if is_distributed():
            # NCCL reduces device tensors only; gloo wants CPU tensors.
            counts = counts.to(device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        top1, top5, images, skipped = (int(v) for v in counts.tolist())
    seconds = time.perf_counter() - start
    if images == 0:
        raise DataError(f"no images were evaluated ({skipped} unreadable)")
    return EvalResult(
        top1=100.0 * top1 / images,
        top5=100.0 * top5 / images,
        images=images,
        seconds=seconds,
        images_per_s=images / seconds if seconds > 0 else float("inf"),
        skipped=skipped,
    )
