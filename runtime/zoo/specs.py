"""Default input specs: how evaluation images are prepared for each model family.

A spec is an :class:`~runtime.format.records.InputSpec` (the record stored in packed files);
``dataclasses.replace`` derives a variant.
"""

from __future__ import annotations

from runtime.format.records import InputSpec

__all__ = ["CIFAR_SPEC", "IMAGENET_MEAN", "IMAGENET_SPEC", "IMAGENET_STD", "InputSpec",
           "imagenet_spec"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The shared CIFAR-10 models were trained with ImageNet statistics (see shared/README.md).
CIFAR_SPEC = InputSpec(shape=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)

IMAGENET_SPEC = InputSpec(shape=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          resize=256, crop=224)


def imagenet_spec(resize: int = 256, crop: int = 224) -> InputSpec:
    """The ImageNet spec for a given resize/crop pair."""
    return InputSpec(shape=(3, crop, crop), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resize=resize, crop=crop)
