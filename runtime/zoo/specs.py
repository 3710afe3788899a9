"""Default input specs: how evaluation images are prepared for each model family.

A spec is a plain JSON-able dict so it can be stored in a packed file and edited by hand:
``shape`` [C, H, W], ``mean`` and ``std`` per channel (images scaled to [0, 1]), ``resize``
(shorter side, or None) and ``crop`` (centre crop size, or None).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["CIFAR_SPEC", "IMAGENET_SPEC", "InputSpec", "imagenet_spec"]

InputSpec = dict[str, Any]

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]

# The shared CIFAR-10 models were trained with ImageNet statistics (see shared/README.md).
CIFAR_SPEC: InputSpec = {
    "shape": [3, 32, 32],
    "mean": _IMAGENET_MEAN,
    "std": _IMAGENET_STD,
    "resize": None,
    "crop": None,
}

IMAGENET_SPEC: InputSpec = {
    "shape": [3, 224, 224],
    "mean": _IMAGENET_MEAN,
    "std": _IMAGENET_STD,
    "resize": 256,
    "crop": 224,
}


def imagenet_spec(resize: int = 256, crop: int = 224) -> InputSpec:
    """A fresh ImageNet spec (callers may mutate it) for a given resize/crop pair."""
    spec = copy.deepcopy(IMAGENET_SPEC)
    spec.update(shape=[3, crop, crop], resize=resize, crop=crop)
    return spec
