"""Training data: which data set, where, and the train/validation splits with augmentation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from runtime.data import (
    ConvertMode,
    build_transform,
    cifar10_dataset,
    colour_mode,
    image_folder_dataset,
    imagenet_dataset,
)
from runtime.errors import DataError
from runtime.zoo.specs import CIFAR_SPEC, IMAGENET_SPEC, InputSpec

DataKind = Literal["cifar10", "imagenet", "folder"]
KINDS: tuple[str, ...] = ("cifar10", "imagenet", "folder")


@dataclass(frozen=True)
class DataSpec:
    """What `packer compress --cifar10/--imagenet/--data DIR` hands a method (CompressJob.data).

    `kind` picks the layout: cifar10 (`train/` and `test/` class folders or
    cifar-10-batches-py), imagenet (`train/` and `val/` of wnid folders), folder (`train/` and
    `val/` or `test/` of class folders, classes in sorted order). `spec` is the input spec
    (shape, mean, std, resize, crop); None takes the data set's usual one.
    """

    kind: DataKind
    root: Path
    batch_size: int = 128
    workers: int = 2
    spec: InputSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"data kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        object.__setattr__(self, "root", Path(self.root))
        if self.batch_size < 1 or self.workers < 0:
            raise DataError(f"batch size must be >= 1 and workers >= 0 "
                            f"({self.batch_size}, {self.workers})")

    def input_spec(self) -> InputSpec:
        return self.spec or (CIFAR_SPEC if self.kind == "cifar10" else IMAGENET_SPEC)


def training_data(data: Any, method: str) -> DataSpec | None:
    """The training data a compression job carries (None: none), checked to be a DataSpec."""
    if data is not None and not isinstance(data, DataSpec):
        raise DataError(f"{method}: training data must be a packer.training.DataSpec, "
                        f"not {type(data).__name__}")
    return data


def epochs_to_run(requested: int | None, data: DataSpec | None, method: str, option: str,
                  default: int, without: str) -> int:
    """The epochs a method trains: `requested`, or `default` when training data was given and
    0 when not. Epochs asked for without data are an error, never a silent skip; `without`
    says what `option`=0 gives instead."""
    if requested is None:
        return default if data is not None else 0
    if requested > 0 and data is None:
        raise DataError(f"{method}: {option}={requested} needs training data: pass --cifar10 "
                        f"DIR, --imagenet DIR or --data DIR, or set {option}=0 ({without})")
    return requested


def train_transform(spec: InputSpec, kind: str) -> T.Compose:
    """The standard augmentation: CIFAR pad-4 random crop + flip; ImageNet the reference's
    Resize(resize) -> RandomCrop(crop) -> flip (both then scaled and normalised as `spec`)."""
    c, h, w = spec.shape
    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    convert = ConvertMode(colour_mode(c))
    if kind == "cifar10" and not spec.resize and not spec.crop:
        return T.Compose([convert, T.Resize((h, w), antialias=True),
                          T.RandomCrop((h, w), padding=4), T.RandomHorizontalFlip(), *tail])
    resize = spec.resize or max(h, w)
    return T.Compose([convert, T.Resize(resize, antialias=True), T.RandomCrop((h, w)),
                      T.RandomHorizontalFlip(), *tail])


def _split_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"no {' or '.join(n + '/' for n in names)} folder in {root} ({what})")


def build_datasets(data: DataSpec, holdout: int = 0, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(augmented train split, plain validation split) for `data`.

    `holdout` > 0 takes that many training images (a seeded draw) out of training and
    validates on them instead of the test/val split, so picking the best epoch does not look
    at the images the final accuracy is reported on."""
    if not data.root.is_dir():
        raise DataError(f"training data folder not found: {data.root}")
    spec = data.input_spec()
    if data.kind == "cifar10":
        train = cifar10_dataset(data.root, "train", spec)
        val = cifar10_dataset(data.root, "test", spec)
    elif data.kind == "imagenet":
        train = imagenet_dataset(_split_dir(data.root, ("train",), "ImageNet train split"), spec)
        val = imagenet_dataset(_split_dir(data.root, ("val",), "ImageNet val split"), spec)
    else:
        train = image_folder_dataset(_split_dir(data.root, ("train",), "training images"), spec)
        val = image_folder_dataset(_split_dir(data.root, ("val", "test"), "validation images"),
                                   spec)
        if list(train.classes) != list(val.classes):
            raise DataError(f"{data.root}: train/ and validation folders have different classes")
    train.transform = train_transform(spec, data.kind)  # type: ignore[attr-defined]
    val.transform = build_transform(spec)  # type: ignore[attr-defined]
    return _hold_out(train, holdout, seed, val.transform) if holdout > 0 else (train, val)


def _hold_out(train: Dataset, count: int, seed: int, plain: Any) -> tuple[Dataset, Dataset]:
    total = len(train)  # type: ignore[arg-type]
    if count >= total:
        raise DataError(f"cannot hold out {count} of {total} training images for validation; "
                        f"hold out fewer (e.g. 5%: {total // 20})")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    plain_view = copy.copy(train)  # same file list, the validation transform
    plain_view.transform = plain  # type: ignore[attr-defined]
    return Subset(train, sorted(order[count:])), Subset(plain_view, sorted(order[:count]))
