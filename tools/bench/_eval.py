"""Top-1 on in-memory image sets: the test folder, and a validation split held out of train/.

Choose on validation, report on test: every benchmark that picks a recipe, an epoch or a
configuration scores the candidates on :func:`validation_set` (seeded training images, the
same draw as the packer's ``holdout=N``) and evaluates the 10,000 test images once per
reported point, next to the uncompressed baseline measured on the same tensor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from _common import arch_of, checkpoint_path, shared_dir
from torch import Tensor, nn
from torch.utils.data import Dataset

from packer.training import DataSpec, build_datasets
from runtime import zoo
from runtime.data import cifar10_dataset, make_loader
from runtime.evaluate import evaluate

EVAL_BATCH = 256
"""Images per forward pass. On this 2-core machine 256 in channels_last ran 1.5-2.5x faster
than 1000 in the default layout (the activations of a batch then stay nearer the cache)."""


@dataclass
class ImageSet:
    """Decoded, normalised images and labels in memory, and where they came from."""

    images: Tensor
    targets: Tensor
    decode_s: float
    source: str

    def __len__(self) -> int:
        return int(self.targets.numel())

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.images.split(EVAL_BATCH), self.targets.split(EVAL_BATCH),
                        strict=True))


def cifar10_root():
    return shared_dir() / "data" / "cifar10"


def _decode(dataset: Dataset, limit: int | None, source: str, workers: int) -> ImageSet:
    start = time.perf_counter()
    images, targets = [], []
    for batch_images, batch_targets, skipped in make_loader(dataset, 500, workers, limit=limit):
        if skipped:
            raise RuntimeError(f"{skipped} images of {source} could not be decoded")
        images.append(batch_images)
        targets.append(batch_targets)
    stacked = torch.cat(images).contiguous(memory_format=torch.channels_last)
    return ImageSet(stacked, torch.cat(targets), time.perf_counter() - start, source)


def test_set(arch: str, limit: int | None = None, workers: int = 2) -> ImageSet:
    """The CIFAR-10 test folder (or ``limit`` evenly spread images of it), decoded once."""
    dataset = cifar10_dataset(cifar10_root(), "test", zoo.input_spec(arch), strict=True)
    n = limit or len(dataset)  # type: ignore[arg-type]
    return _decode(dataset, limit, f"{n:,} CIFAR-10 test images", workers)


def validation_set(holdout: int, seed: int = 0, limit: int | None = None,
                   workers: int = 2) -> ImageSet:
    """The ``holdout`` training images that ``packer.training.build_datasets`` holds out with
    ``seed`` (PQF's ``holdout=N`` validates on exactly these), without augmentation.

    The shared checkpoints were fine-tuned on all of train/, so these images were seen by the
    uncompressed model: their top-1 reads high. They rank candidates; they do not estimate
    test accuracy.
    """
    _, held_out = build_datasets(DataSpec("cifar10", cifar10_root()), holdout, seed)
    n = min(limit or holdout, holdout)
    return _decode(held_out, limit, f"{n:,} of {holdout:,} training images held out "
                   f"(seed {seed})", workers)


def top1(model: nn.Module, images: ImageSet) -> float:
    """Top-1 accuracy in percent of ``model`` on ``images`` (inference mode)."""
    model = model.to(memory_format=torch.channels_last)
    return evaluate(model, images.batches(), progress=False).top1


def load_fp32(model: str) -> nn.Module:
    """The plain path: torch.load the fp32 state_dict, build the module, load_state_dict."""
    state = torch.load(checkpoint_path(model), map_location="cpu", weights_only=True)
    module = zoo.build(arch_of(model))
    module.load_state_dict(state, strict=True)
    return module.eval()


def standard_error(top1_percent: float, images: int) -> float:
    """Binomial standard error of a top-1 measured on ``images`` images, in points:
    sqrt(p (1 - p) / n), about 0.34 at 88% on 10,000."""
    p = top1_percent / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / images)


def margin_note(margin: float, top1_percent: float, images: int) -> str:
    """'' when the bar's margin exceeds one standard error, else a note that says it does not."""
    se = standard_error(top1_percent, images)
    if abs(margin) >= se:
        return ""
    return (f" (margin {margin:+.2f} pts is smaller than the standard error of a top-1 on "
            f"{images:,} images, {se:.2f} pts)")
