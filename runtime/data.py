"""Evaluation data: image folders and CIFAR-10 as datasets, plus a deterministic loader.

Every dataset yields ``(image_tensor, label)``; an image that cannot be decoded yields
``(None, label)`` and is dropped (and counted) by :func:`collate_skipping`, so one bad file
does not end a long evaluation. With ``strict=True`` it raises :class:`DataError` instead.
Images are prepared as an :class:`InputSpec` says (defaults in :mod:`runtime.zoo.specs`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10

from runtime.distributed import is_distributed, rank, world_size
from runtime.errors import DataError
from runtime.zoo.specs import CIFAR_SPEC, IMAGENET_SPEC, InputSpec

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "Batch",
    "ConvertMode",
    "ImageFiles",
    "ShardSampler",
    "build_transform",
    "calibration_root",
    "cifar10_dataset",
    "class_folders",
    "colour_mode",
    "collate_skipping",
    "image_folder_dataset",
    "imagenet_classes",
    "imagenet_dataset",
    "make_loader",
    "spread_indices",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for truncated, corrupt or hostile files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Transform = Callable[[Image.Image], Tensor]


# --- transforms -------------------------------------------------------------------------------


class ConvertMode:
    """Convert to the spec's colour mode (grayscale and CMYK JPEGs exist in ImageNet); an
    object rather than a lambda so that spawned loader workers can receive it (multiprocessing
    serializes the transform; no packed file is involved)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


def colour_mode(channels: int) -> str:
    """The PIL mode of images with `channels` channels: RGB for 3, L (grayscale) for 1."""
    return "RGB" if channels == 3 else "L"


class _FitTo:
    """Resize to exactly (H, W) only when the image is not already that size."""

    def __init__(self, height: int, width: int) -> None:
        self.size = (height, width)
        self._resize = T.Resize(self.size, antialias=True)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if (img.height, img.width) == self.size else self._resize(img)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"input spec {key}={value!r} must be a positive integer")
    return value


def build_transform(spec: InputSpec) -> Transform:
    """PIL image -> normalised tensor of ``spec.shape``: resize, crop, fit, scale, normalise."""
    try:
        shape, mean, std = list(spec.shape), list(spec.mean), list(spec.std)
    except TypeError as exc:
        raise DataError(f"input spec needs shape, mean and std sequences: {exc}") from exc
    if len(shape) != 3:
        raise DataError(f"input spec shape {shape} must be [C, H, W]")
    channels, height, width = (_positive_int("shape", v) for v in shape)
    if channels not in (1, 3):
        raise DataError(f"input spec has {channels} channels; images give 1 or 3")
    if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
        raise DataError(f"input spec mean/std need {channels} values each, std > 0")
    steps: list[Callable[[Any], Any]] = [ConvertMode(colour_mode(channels))]
    if spec.resize is not None:
        steps.append(T.Resize(_positive_int("resize", spec.resize), antialias=True))
    if spec.crop is not None:
        steps.append(T.CenterCrop(_positive_int("crop", spec.crop)))
    steps += [_FitTo(height, width), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


# --- datasets ---------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Labelled image files, decoded lazily; unreadable ones yield ``(None, label)``.

    ``skipped`` lists files skipped *in this process*; with loader workers the authoritative
    count is the one :func:`collate_skipping` puts in each batch.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Transform,
        strict: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.strict = strict
        self.skipped: list[str] = []

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()  # decode now, so truncation is caught here and not in a transform
                return self.transform(img), label
        except _DECODE_ERRORS as exc:
            if self.strict:
                raise DataError(f"unreadable image {path}: {exc}") from exc
            log.warning("skipping unreadable image %s: %s", path, exc)
            self.skipped.append(path)
            return None, label


class _TransformedCifar(Dataset):
    """torchvision's CIFAR-10 batch arrays (its own loader) with a spec transform."""

    def __init__(self, base: CIFAR10, transform: Transform) -> None:
        self.base = base
        self.transform = transform
        self.classes = list(CIFAR10_CLASSES)
        self.skipped: list[str] = []

    @property
    def targets(self) -> list[int]:
        return list(self.base.targets)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.base[index]
        return self.transform(img), int(label)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_files(folder: Path) -> list[str]:
    """Image files under one class folder, recursively, in a stable sorted order."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


def class_folders(folder: Path) -> list[str]:
    """The class folder names under ``folder`` in label order (sorted, hidden ones skipped),
    as torchvision's ImageFolder orders them."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan(
    folder: Path, class_to_idx: Mapping[str, int] | None, expected: str
) -> tuple[list[tuple[str, int]], list[str]]:
    """``<class>/<image>`` samples under ``folder``; labels from ``class_to_idx`` if given."""
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder} (expected {expected})")
    dirs = class_folders(folder)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(dirs)}
        classes = dirs
    else:
        unknown = [d for d in dirs if d not in class_to_idx]
        if unknown:
            listed = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(f"unknown class folder(s) in {folder}: {listed} (expected {expected})")
        classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
    samples = [(f, class_to_idx[d]) for d in dirs for f in _class_files(folder / d)]
    if not samples:
        raise DataError(f"no images found in {folder} (expected {expected})")
    samples.sort(key=lambda s: s[1])  # stable: by label, then by path within a class
    return samples, classes


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes as (wnid, name), in canonical index order."""
    tsv = resources.files("runtime").joinpath("data").joinpath("imagenet_classes.tsv")
    text = tsv.read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    if [int(r[0]) for r in rows] != list(range(1000)):
        raise DataError("runtime/data/imagenet_classes.tsv is damaged: indices are not 0..999")
    return tuple((wnid, name) for _, wnid, name in rows)


def imagenet_dataset(
    root: str | os.PathLike[str],
    spec: InputSpec | None = None,
    strict: bool = False,
) -> ImageFiles:
    """An ImageNet ``val/`` folder of wnid subfolders, labelled with the true 1k class index.

    ``root`` may be the folder holding ``val/`` or the ``val`` folder itself; any subset of the
    1000 classes may be present.
    """
    root = Path(root)
    folder = root / "val" if (root / "val").is_dir() else root
    wnids = [wnid for wnid, _ in imagenet_classes()]
    samples, classes = _scan(
        folder, {w: i for i, w in enumerate(wnids)}, "val/<wnid>/<image> with ImageNet-1k wnids"
    )
    return ImageFiles(samples, classes, build_transform(spec or IMAGENET_SPEC), strict)


def cifar10_dataset(
    root: str | os.PathLike[str],
    split: str = "test",
    spec: InputSpec | None = None,
    strict: bool = False,
) -> Dataset:
    """CIFAR-10 from an image folder (``<split>/<class>/*.jpg``) or ``cifar-10-batches-py``.

    For a folder, ``root`` may hold ``<split>/`` or be that split folder itself; class folders
    must be CIFAR-10 class names and get their CIFAR-10 index.
    """
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', not {split!r}")
    root = Path(root)
    transform = build_transform(spec or CIFAR_SPEC)
    batches = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if batches.is_dir():
        try:
            base = CIFAR10(str(batches.parent), train=split == "train", download=False)
        except RuntimeError as exc:  # torchvision's "not found or corrupted"
            raise DataError(f"CIFAR-10 batches in {batches} are incomplete: {exc}") from exc
        return _TransformedCifar(base, transform)
    if (root / split).is_dir():
        folder = root / split
    elif any((root / s).is_dir() for s in ("train", "test")):
        raise DataError(f"no {split}/ folder in {root}")
    else:
        folder = root
    expected = f"{split}/<class>/<image> with CIFAR-10 class names, or cifar-10-batches-py/"
    samples, classes = _scan(folder, {c: i for i, c in enumerate(CIFAR10_CLASSES)}, expected)
    return ImageFiles(samples, classes, transform, strict)


def image_folder_dataset(
    root: str | os.PathLike[str],
    spec: InputSpec | None = None,
    strict: bool = False,
) -> ImageFiles:
    """Any ``<class>/<image>`` folder; classes indexed in sorted order (torchvision ImageFolder)."""
    samples, classes = _scan(Path(root), None, "<class>/<image> subfolders")
    return ImageFiles(samples, classes, build_transform(spec or IMAGENET_SPEC), strict)


# --- loading ----------------------------------------------------------------------------------


class Batch(NamedTuple):
    """A collated batch, with the number of images of it that could not be decoded."""

    images: Tensor
    targets: Tensor
    skipped: int


def collate_skipping(items: Sequence[tuple[Tensor | None, int]]) -> Batch:
    """Stack the decodable images of a batch and count the others."""
    kept = [(img, label) for img, label in items if img is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([img for img, _ in kept])
    targets = torch.tensor([label for _, label in kept], dtype=torch.long)
    return Batch(images, targets, skipped)


def spread_indices(total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)``: ``floor(i * total / limit)``.

    Folder datasets are sorted by class, so this takes about the same number of images from
    every class instead of the first classes only. ``None`` (or ``limit >= total``) keeps all.
    """
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise DataError(f"limit must be at least 1, not {limit}")
    return [i * total // limit for i in range(limit)]


class ShardSampler(Sampler[int]):
    """This process's share of a data set's indices: every ``world``-th from ``rank``.

    Evaluation (``seed=None``): the indices in order, with no padding. torch's
    DistributedSampler repeats samples to even out the shards, which would count those images
    twice once results are summed across processes.

    Training (``seed`` given): a fresh seeded shuffle each epoch (:meth:`set_epoch`), of which
    ``limit`` are drawn (None: all), cut to shards of equal length: DDP ranks that ran different
    numbers of steps would hang.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1, seed: int | None = None,
                 limit: int | None = None) -> None:
        self.length, self.rank, self.world, self.seed = length, rank, world, seed
        self.total = length if limit is None else min(limit, length)
        if seed is None:
            self.per_rank = len(range(rank, self.total, world))
        else:
            self.per_rank = self.total // world
            if self.per_rank == 0:
                raise DataError(f"{self.total} training images cannot be shared by {world} "
                                f"processes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            return iter(range(self.rank, self.total, self.world))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=gen)[: self.per_rank * self.world]
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    limit: int | None = None,
    distributed: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader in fixed order; ``limit`` keeps :func:`spread_indices` images.

    With ``distributed=True`` (torch.distributed initialised) each process gets a disjoint
    strided shard of the same selection, so summed results equal a single-process run.
    """
    if batch_size < 1 or workers < 0:
        raise DataError(f"batch size must be >= 1 and workers >= 0 ({batch_size}, {workers})")
    total = len(dataset)  # type: ignore[arg-type]
    if limit is not None:
        dataset = Subset(dataset, spread_indices(total, limit))
    sampler: Sampler[int] | None = None
    if distributed:
        if not is_distributed():
            raise RuntimeError("make_loader(distributed=True) needs torch.distributed initialised")
        sampler = ShardSampler(len(dataset), rank(), world_size())  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=pin_memory,
    )


def calibration_root(root: str | os.PathLike[str]) -> Path:
    """The folder of class folders that calibration reads: ``train/``, else ``val/``, else
    ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"calibration data folder {root} does not exist")
    return next((root / s for s in ("train", "val") if (root / s).is_dir()), root)


def calibration_dataset(
    root: str | os.PathLike[str], spec: InputSpec | None = None
) -> Dataset:
    """Images to calibrate activation ranges on; labels are ignored.

    Takes a CIFAR-style root (its ``train/`` split), an ImageNet root (its ``train/`` or
    ``val/``), or any ``<class>/<image>`` folder.
    """
    samples, classes = _scan(calibration_root(root), None,
                             "<class>/<image> subfolders (or train/<class>/...)")
    return ImageFiles(samples, classes, build_transform(spec or IMAGENET_SPEC), False)
