"""Calibration images (`--calib-data`): loaded once as tensors, checked before any work.

One seeded draw from the folder's images gives two disjoint sets: the calibration images
(sensitivity, AdaRound, BatchNorm re-estimation, bias correction) and, when asked, a
held-out split with labels (`--max-drop` measures accuracy there; settings are chosen on it,
never on the test set).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from runtime.data import calibration_dataset, collate_skipping
from runtime.errors import DataError
from runtime.format.records import InputSpec

LOAD_BATCH = 256


@dataclass
class CalibrationSet:
    """Calibration images (no labels used) and an optional labelled held-out split."""

    root: Path
    images: Tensor  # [N, C, H, W], normalised as the model expects
    holdout: Tensor | None = None
    holdout_labels: Tensor | None = None
    available: int = 0  # images in the folder
    skipped: int = 0  # unreadable files among those drawn
    seconds: float = 0.0  # decoding time
    seed: int = 0

    def batches(self, size: int = 128, limit: int | None = None) -> Iterator[Tensor]:
        """The calibration images in fixed order, `size` at a time (the first `limit`)."""
        images = self.images if limit is None else self.images[:limit]
        for start in range(0, images.shape[0], size):
            yield images[start:start + size]

    @property
    def fingerprint(self) -> str:
        """What identifies the set for caches: folder, counts, draw seed."""
        held = 0 if self.holdout is None else self.holdout.shape[0]
        return f"{self.root.resolve()}|{self.images.shape[0]}|{held}|{self.available}|{self.seed}"

    def report(self) -> dict[str, Any]:
        return {"data": str(self.root), "images": int(self.images.shape[0]),
                "holdout_images": 0 if self.holdout is None else int(self.holdout.shape[0]),
                "available": self.available, "unreadable_skipped": self.skipped,
                "load_seconds": round(self.seconds, 2)}


def _native_size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError):
        return None


def _check_input_size(samples: list[tuple[str, int]], spec: InputSpec, root: Path) -> None:
    """A model whose input spec neither resizes nor crops takes images of its own size; a
    folder of other-sized images (ImageNet photos for a CIFAR model) would be squashed into
    it silently, and every measurement made on them would be meaningless."""
    if spec.resize is not None or spec.crop is not None:
        return
    want = (int(spec.shape[1]), int(spec.shape[2]))
    step = max(1, len(samples) // 16)
    sizes = [s for s in (_native_size(p) for p, _ in samples[::step][:16]) if s is not None]
    wrong = [s for s in sizes if s != want]
    if sizes and len(wrong) * 2 > len(sizes):
        h, w = wrong[0]
        raise DataError(f"calibration images in {root} are {h}x{w} but the model takes "
                        f"{want[0]}x{want[1]} inputs (its input spec does not resize): pass "
                        f"images of that size (e.g. the training set) or set --input-size")


def load_calibration(root: str | Path, spec: InputSpec, images: int,
                     holdout: int = 0, seed: int = 0) -> CalibrationSet:
    """Decode `images` calibration images (+ `holdout` held-out ones) drawn with `seed` from
    `root` (a CIFAR/ImageNet root, whose train/ split is used, or any <class>/<image> folder).

    Raises DataError for a missing or empty folder, images of the wrong size, or when none
    of the drawn files can be decoded.
    """
    root = Path(root)
    if images < 1:
        raise DataError("--calib-images must be at least 1")
    if holdout < 0:
        raise DataError("the held-out split cannot be negative")
    started = time.perf_counter()
    try:
        dataset = calibration_dataset(root, spec)
    except OSError as exc:  # a folder that exists but cannot be listed
        raise DataError(f"cannot read calibration data {root}: {exc.strerror or exc}") from None
    _check_input_size(dataset.samples, spec, root)
    total = len(dataset)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    n_cal = min(images, total)
    n_hold = min(holdout, total - n_cal)
    if holdout and n_hold < 1:
        raise DataError(f"{root} has {total} images: none left for a held-out split after "
                        f"{n_cal} calibration images (lower --calib-images)")

    def decode(indices: list[int]) -> tuple[Tensor, Tensor, int]:
        parts, labels, skipped = [], [], 0
        for start in range(0, len(indices), LOAD_BATCH):
            batch = collate_skipping([dataset[i] for i in indices[start:start + LOAD_BATCH]])
            skipped += batch.skipped
            if batch.images.numel():
                parts.append(batch.images)
                labels.append(batch.targets)
        if not parts:
            raise DataError(f"none of the {len(indices)} calibration images drawn from {root} "
                            f"could be read")
        return torch.cat(parts), torch.cat(labels), skipped

    cal, _, skipped = decode(order[:n_cal])
    out = CalibrationSet(root, cal, available=total, skipped=skipped, seed=seed)
    if n_hold:
        out.holdout, out.holdout_labels, more = decode(order[n_cal:n_cal + n_hold])
        out.skipped += more
    out.seconds = time.perf_counter() - started
    return out


def format_cost(cost: dict[str, Any]) -> str:
    """One line for `packer compress`: calibration images and where the seconds went."""
    steps = ", ".join(f"{k} {v:.1f}" for k, v in cost["seconds"].items() if k != "total")
    held = f" + {cost['holdout_images']} held out" if cost.get("holdout_images") else ""
    return (f"calibration {cost['images']} images{held} from {cost['data']}: "
            f"{cost['seconds']['total']:.1f} s ({steps}; {cost['builds']} build(s))")
