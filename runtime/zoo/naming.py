"""Architecture names as users type them: the one place short names are resolved.

Files always store the full allow-listed name (``cifar_resnet20``, ``torchvision.resnet18``,
``timm.deit_tiny_patch16_224``). People type the libraries' own names: ``resnet18`` as
``torchvision.models.get_model`` takes it, ``deit_tiny_patch16_224`` as ``timm.create_model``
takes it, ``resnet20`` as pytorch_resnet_cifar10 calls its CIFAR ResNets. A short name means the
CIFAR zoo's or torchvision's model of that name, else timm's; given a checkpoint, only the
models its tensors fit count (so a timm EfficientNet's weights pick ``timm.efficientnet_b0``).
Two candidates left is an error that lists them.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from torch import Tensor

from runtime.errors import ArchitectureError
from runtime.zoo.inference import match
from runtime.zoo.registry import (
    BUILDERS,
    CIFAR_NAMES,
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    _timm_names as timm_names,
    names,
)

__all__ = ["resolve_name", "short_name", "short_names"]

_CIFAR_PREFIX = "cifar_"


def short_name(full: str) -> str:
    """The name the model's own library gives it: ``torchvision.resnet18`` -> ``resnet18``."""
    for prefix in (TORCHVISION_PREFIX, TIMM_PREFIX):
        if full.startswith(prefix):
            return full.removeprefix(prefix)
    return full.removeprefix(_CIFAR_PREFIX) if full in CIFAR_NAMES else full


def short_names() -> dict[str, str]:
    """Every listed (non-timm) architecture's full name -> its short name."""
    return {full: short_name(full) for full in names()}


def _is_full(name: str) -> bool:
    if name in BUILDERS:
        return True
    return name.startswith(TIMM_PREFIX) and name.removeprefix(TIMM_PREFIX) in timm_names()


def _fits(full: str, state_dict: Mapping[str, Tensor] | None) -> bool:
    return state_dict is None or match(full, state_dict) is not None


def resolve_name(name: str, state_dict: Mapping[str, Tensor] | None = None) -> str:
    """The full allow-listed name `name` stands for; with `state_dict`, the one it fits.

    A full name is returned as it is (whether the weights fit is the caller's check). When no
    candidate fits the weights, the preferred one is returned, so that the caller's mismatch
    message names it. timm is imported only when neither the zoo nor torchvision has the name.
    """
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"architecture name must be a non-empty string, not {name!r}")
    if _is_full(name):
        return name
    local = [full for full in BUILDERS if short_name(full) == name]
    fitting = [full for full in local if _fits(full, state_dict)]
    if len(fitting) > 1:
        raise ArchitectureError(f"architecture name {name!r} is ambiguous: it may mean "
                                f"{' or '.join(fitting)}; give one of these full names")
    if fitting:
        return fitting[0]
    timm = TIMM_PREFIX + name if name in timm_names() else None
    if timm and (not local or _fits(timm, state_dict)):
        return timm
    if local:
        return local[0]
    raise ArchitectureError(f"unknown architecture {name!r}{_suggestion(name)}")


def _suggestion(name: str) -> str:
    known = {*names(), *short_names().values()}
    close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else (
        f": not one of the {len(BUILDERS)} allow-listed architectures or timm's models")
