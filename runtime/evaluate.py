"""Top-1/top-5 accuracy of a model over a loader, on one process or summed over many.

Correct counts are accumulated on the device and read once at the end, so the loop never
waits on the accelerator per batch. When torch.distributed is initialised the counts are
summed over all processes (give each its shard with ``make_loader(distributed=True)``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from runtime.distributed import is_distributed, local_world_size, rank
from runtime.errors import ArchitectureError, DataError

__all__ = ["ChannelsLast", "EvalPlan", "EvalResult", "eval_plan", "evaluate", "fold_batchnorm",
           "inference_model"]

MAX_CPU_WORKERS = 4
MAX_GPU_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: str, cores: int) -> int:
    """Data-loading processes for an evaluation on `device` with `cores` CPUs.

    On the CPU the model and the loader share the cores: every worker takes a core from the
    model's threads, and a few cores decode images faster than the rest run the model
    (tools/bench/eval_speed.py: on 2 cores 0 workers beat 1 and 4), so no worker up to 4
    cores, then one per 4 cores, at most 4. With a GPU the CPU only loads: up to 8 workers.
    """
    if device != "cpu":
        return max(1, min(MAX_GPU_WORKERS, cores - 1))
    return 0 if cores <= 4 else min(MAX_CPU_WORKERS, cores // 4)


@dataclass(frozen=True)
class EvalPlan:
    """How an evaluation uses the CPUs: loader processes, and the threads the model runs on
    (torch's intra-op threads, or onnxruntime's; None: the library's default)."""

    workers: int
    threads: int | None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """torch's intra-op threads set to `threads` for the duration (restored after)."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def eval_plan(device: str, workers: int | None = None, cores: int | None = None) -> EvalPlan:
    """Workers (`workers`, else `default_workers`) and model threads that together use each of
    the `cores` (default: the usable CPUs, shared evenly by the processes torchrun started on
    this machine) once: on the CPU the model gets the cores the workers leave, never fewer
    than one."""
    cores = cores or max(1, usable_cpus() // max(1, local_world_size()))
    if workers is None:
        workers = default_workers(device, cores)
    threads = max(1, cores - workers) if device == "cpu" else None
    return EvalPlan(workers, threads)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with each BatchNorm that follows a convolution folded into it
    (torch.fx), for inference: on the CPU a ResNet's BatchNorms took ~13% of torch's forward
    (tools/bench/eval_speed.py). The same arithmetic up to float rounding. A model torch.fx
    cannot trace is returned as it is."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError):
        return model


class ChannelsLast(nn.Module):
    """`model` with its weights in channels-last memory format, given its 4-D inputs in the
    same format: oneDNN's CPU convolutions run faster on it (ResNet-20 at batch 256: ~1.4x
    the forward; tools/bench/eval_speed.py measures the eval loop). Same arithmetic up to
    float rounding; other inputs pass through unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def inference_model(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """What `runtime eval` runs on the torch backend: BatchNorm folded into the convolutions
    and, on the CPU, channels-last memory format."""
    model = fold_batchnorm(model)
    return ChannelsLast(model) if torch.device(device).type == "cpu" else model


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
