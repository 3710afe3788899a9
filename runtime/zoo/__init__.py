"""Allow-listed model architectures: build by name, default input specs, infer from weights.

``runtime`` only constructs models listed in :data:`BUILDERS` (the CIFAR ResNets of
:mod:`runtime.zoo.cifar_resnet` and torchvision's classification models, prefixed
``torchvision.``), so a packed file can choose an architecture but never code.
:func:`resolve_name` turns the short names people type (``resnet18``) into these full names.
"""

from __future__ import annotations

from runtime.zoo.inference import infer, infer_one, infer_with_kwargs, match, shapes_of
from runtime.zoo.naming import resolve_name, short_name, short_names
from runtime.zoo.registry import (
    BUILDERS,
    CIFAR_NAMES,
    TORCHVISION_PREFIX,
    build,
    build_skeleton,
    input_spec,
    names,
    validate_kwargs,
)
from runtime.zoo.specs import InputSpec

__all__ = [
    "BUILDERS",
    "CIFAR_NAMES",
    "TORCHVISION_PREFIX",
    "InputSpec",
    "build",
    "build_skeleton",
    "infer",
    "infer_one",
    "infer_with_kwargs",
    "input_spec",
    "match",
    "names",
    "resolve_name",
    "shapes_of",
    "short_name",
    "short_names",
    "validate_kwargs",
]
