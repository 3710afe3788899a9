"""Which class names a packed file stores: from `--class-names FILE`, else from the data folder
the packer was given (`--cifar10`, `--imagenet`, `--data`, then `--calib-data`).

Names are the labels a service answers with (`runtime.class_names`), in the model's output
order: the order the data loaders give the class folders, which is the order training used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from packer.training import DataSpec
from runtime.data import CIFAR10_CLASSES, calibration_root, class_folders, imagenet_classes
from runtime.errors import ConfigError
from runtime.format.index import MAX_NAME_BYTES

__all__ = ["class_names_for", "names_from_data", "read_names_file"]


def _problem(name: str) -> str | None:
    if not name:
        return "an empty name"
    if not name.isprintable():
        return f"{name!r} holds control characters"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"a name over {MAX_NAME_BYTES} bytes ({name[:40]!r}...)"
    return None


def read_names_file(path: Path) -> tuple[str, ...]:
    """One class name per line (UTF-8; surrounding spaces and blank lines ignored)."""
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: class names file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read class names ({exc})") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    for name in names:
        if problem := _problem(name):
            raise ConfigError(f"{path}: {problem}; give one class name per line")
    return names


def _imagenet_names() -> tuple[str, ...]:
    return tuple(name for _, name in imagenet_classes())


def _folder_names(root: Path) -> tuple[str, ...]:
    """Class folder names in label order; wnid folders are ImageNet-1k, whose loader labels
    them with the canonical 1000-class index whichever subset is present."""
    folders = class_folders(root)
    wnids = {w for w, _ in imagenet_classes()}
    if folders and all(f in wnids for f in folders):
        return _imagenet_names()
    return tuple(folders)


def names_from_data(data: DataSpec | None,
                    calib_data: Path | None) -> tuple[tuple[str, ...], str] | None:
    """(names, where they came from) for the data folders given, or None."""
    if data is not None:
        if data.kind == "cifar10":
            return CIFAR10_CLASSES, "--cifar10"
        if data.kind == "imagenet":
            return _imagenet_names(), "ImageNet-1k (--imagenet)"
        root = data.root / "train" if (data.root / "train").is_dir() else data.root
        if root.is_dir():
            return _folder_names(root), f"--data {data.root}"
    if calib_data is not None and Path(calib_data).is_dir():
        return _folder_names(calibration_root(calib_data)), f"--calib-data {calib_data}"
    return None


def class_names_for(names_file: Path | None, data: DataSpec | None, calib_data: Path | None,
                    num_classes: int) -> tuple[str, ...]:
    """The names to store for a model with `num_classes` outputs; () when there are none.
    A names file that does not fit is an error; training data that does not fit stores no
    names, with a warning; calibration images often sit in any folder, so those that do not
    fit store none, quietly."""
    if names_file is not None:
        names = read_names_file(names_file)
        if len(names) != num_classes:
            raise ConfigError(f"{names_file}: {len(names)} class names, but the model has "
                              f"{num_classes} classes; give one name per line, in output order")
        return names
    found = names_from_data(data, calib_data)
    if found is None:
        return ()
    names, source = found
    problem = next((p for p in map(_problem, names) if p), None)
    if len(names) != num_classes or problem:
        if data is None:
            return ()
        why = problem or f"{len(names)} class folders for a model with {num_classes} classes"
        warnings.warn(f"no class names stored: {source} gives {why}; pass --class-names FILE",
                      UserWarning, stacklevel=2)
        return ()
    return names
