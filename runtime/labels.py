"""Class names of a packed model: what a service answers instead of an output index."""

from __future__ import annotations

import os

from runtime.data import imagenet_classes
from runtime.format.reader import PackedFile, open_packed

IMAGENET_CLASSES = 1000


def class_names(source: str | os.PathLike | PackedFile) -> list[str] | None:
    """The model's class names in output order: the file's own (stored by the packer from its
    data folder or --class-names), else ImageNet-1k's for a 1000-class model, else None."""
    if isinstance(source, PackedFile):
        model = source.model
    else:
        with open_packed(source) as packed:
            model = packed.model
    if model.class_names:
        return list(model.class_names)
    if model.num_classes == IMAGENET_CLASSES:
        return [name for _, name in imagenet_classes()]
    return None
