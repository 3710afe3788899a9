"""The allow-list of architectures a packed file may name, and safe construction from it.

Files only ever carry a *name* and a few JSON scalars; they are looked up here, never imported,
so a file cannot make the runtime execute code of its choosing. torchvision models are always
built with ``weights=None`` so nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from runtime.errors import ArchitectureError
from runtime.zoo import cifar_resnet
from runtime.zoo.specs import CIFAR_SPEC, InputSpec, imagenet_spec

__all__ = [
    "BUILDERS",
    "CIFAR_NAMES",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "build",
    "build_skeleton",
    "family",
    "input_spec",
    "names",
    "validate_kwargs",
]

TORCHVISION_PREFIX = "torchvision."
TIMM_PREFIX = "timm."  # timm models, when the optional `timm` extra is installed

CIFAR_NAMES = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56")

# Keyword names a file may pass, with the JSON types each accepts. Anything else is rejected
# before any builder runs; a builder that does not take one of these is reported, not crashed.
_KWARG_TYPES: dict[str, tuple[type, ...]] = {
    "num_classes": (int,),
    "dropout": (int, float),
    "aux_logits": (bool,),
}
_CIFAR_KWARGS = frozenset({"num_classes"})
_MAX_CLASSES = 1_000_000

# torchvision models whose native resolution is not the usual resize 256 / crop 224.
_TORCHVISION_SIZES: dict[str, tuple[int, int]] = {"inception_v3": (342, 299)}


def _torchvision_builders() -> dict[str, Callable[..., nn.Module]]:
    """Every torchvision classification model (the top-level ``torchvision.models`` ones)."""
    out: dict[str, Callable[..., nn.Module]] = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        builder = torchvision.models.get_model_builder(name)
        out[TORCHVISION_PREFIX + name] = functools.partial(builder, weights=None)
    return out


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: getattr(cifar_resnet, name) for name in CIFAR_NAMES},
    **_torchvision_builders(),
}


@functools.cache
def _timm_names() -> frozenset[str]:
    """timm's model names, or none without timm. Imported on first use only: importing timm
    takes seconds, and services that never name a timm model should not pay for it."""
    try:
        import timm
    except ImportError:
        return frozenset()
    return frozenset(timm.list_models())


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    import timm

    return functools.partial(timm.create_model, name.removeprefix(TIMM_PREFIX),
                             pretrained=False)


def _builder(name: str) -> Callable[..., nn.Module]:
    _check_name(name)
    return _timm_builder(name) if name.startswith(TIMM_PREFIX) else BUILDERS[name]


def names() -> list[str]:
    """All allow-listed architecture names, CIFAR zoo first."""
    return list(BUILDERS)


def family(name: str) -> str:
    """A grouping key: architectures of one family share their top-level module names."""
    _check_name(name)
    if name in CIFAR_NAMES:
        return "cifar_resnet"
    if name.startswith(TIMM_PREFIX):
        return "timm"
    builder = BUILDERS[name]
    assert isinstance(builder, functools.partial)
    return builder.func.__module__


def _check_name(name: str) -> None:
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        if not _timm_names():
            raise ArchitectureError(f"{name} needs timm: pip install 'weightpack[timm]'")
        if name.removeprefix(TIMM_PREFIX) in _timm_names():
            return
    if not isinstance(name, str) or name not in BUILDERS:
        examples = ", ".join(
            ["cifar_resnet20", "cifar_resnet56", "torchvision.resnet18", "torchvision.resnet50"]
        )
        raise ArchitectureError(
            f"unknown architecture {name!r}: not in the allow-list of {len(BUILDERS)} "
            f"(e.g. {examples}; see runtime.zoo.names())"
        )


def validate_kwargs(name: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check builder kwargs from a file: known keyword names, JSON scalar values, sane ranges."""
    _check_name(name)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ArchitectureError(f"kwargs for {name} must be an object, got {type(kwargs).__name__}")
    allowed = _CIFAR_KWARGS if name in CIFAR_NAMES else frozenset(_KWARG_TYPES)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise ArchitectureError(
                f"kwarg {key!r} is not accepted for {name} (allowed: {', '.join(sorted(allowed))})"
            )
        types = _KWARG_TYPES[key]
        # bool is an int in Python; only accept it where a bool is wanted.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ArchitectureError(f"kwarg {key}={value!r} for {name} has the wrong type")
        if key == "num_classes" and not 1 <= value <= _MAX_CLASSES:
            raise ArchitectureError(f"num_classes={value} for {name} is out of range")
        if key == "dropout" and not 0.0 <= value <= 1.0:
            raise ArchitectureError(f"dropout={value} for {name} is outside [0, 1]")
        out[key] = value
    return out


def build(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Construct an allow-listed architecture with randomly initialised weights (no download)."""
    return _construct(name, validate_kwargs(name, kwargs))


def build_skeleton(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The architecture with every tensor over SKELETON_REAL_ELEMENTS elements on the meta
    device: its names, shapes and dtypes, at a cost in memory and time that does not grow with
    the model (kwargs such as num_classes=10**6 cost nothing either).

    Small tensors stay real because some builders compute with them (RegNet derives its
    widths through torch ops and ``.tolist()``, which meta tensors cannot answer); so do the
    buffers the builders derive (e.g. Swin's relative position index). Builders that mix a
    small and a large tensor in one op, or read a large one, are built on the meta device
    entirely instead (timm's ViTamin and Swin-V2).
    """
    checked = validate_kwargs(name, kwargs)
    for device in (_LargeTensorsOnMeta, lambda: torch.device("meta")):
        try:
            with device():
                return _construct(name, checked)
        except ArchitectureError:
            raise
        except Exception:  # noqa: BLE001, S112 - builder code that needs data it cannot have
            continue
    # No allow-listed builder tried needs this (all of torchvision's and a sample of timm's
    # build one way or the other); an untried one is built for real rather than refused.
    return _construct(name, checked)


SKELETON_REAL_ELEMENTS = 1 << 14

_SIZED_FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones,
                              torch.full, torch.rand, torch.randn, torch.randint,
                              torch.randperm, torch.eye})

_INIT_IN_PLACE = frozenset(getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "fill_", "zero_", "bernoulli_", "exponential_", "random_",
    "log_normal_", "cauchy_", "geometric_", "erfinv_", "clamp_", "mul_", "add_", "sub_",
    "div_", "copy_"))


_RANDOM_INIT = frozenset({
    *(getattr(torch.Tensor, name) for name in (
        "normal_", "uniform_", "bernoulli_", "exponential_", "random_", "log_normal_",
        "cauchy_", "geometric_")),
    torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_})
"""Random initialisers: in a skeleton every stored tensor is replaced by the file's values and
nothing may depend on a random draw, so they are skipped on real tensors too (the small ones
of a ResNet-56 cost a fifth of its skeleton's build)."""


_SHAPED_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones})


def _plain_size(func: Any, args: tuple) -> int | None:
    """Elements of `torch.empty/zeros/ones(*ints)` or `(sizes)` (how nn layers create their
    tensors), counted without a meta call; None for any other form."""
    if func not in _SHAPED_FACTORIES or not args:
        return None
    size = args[0] if len(args) == 1 and isinstance(args[0], tuple | list | torch.Size) else args
    if not all(type(d) is int and d >= 0 for d in size):
        return None
    return math.prod(size)


class _LargeTensorsOnMeta(TorchFunctionMode):
    """Sized tensor factories called without a device create large tensors on `meta`.

    Function modes are per thread, so a service building real models in other threads is not
    affected. The meta call costs nothing and tells the size before anything is allocated.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED_FACTORIES:
            if kwargs.get("device") is None:
                numel = _plain_size(func, args)
                if numel is None:  # any other signature: ask the meta device
                    meta = func(*args, **{**kwargs, "device": "meta"})
                    if meta.numel() > SKELETON_REAL_ELEMENTS:
                        return meta
                elif numel > SKELETON_REAL_ELEMENTS:
                    return func(*args, **{**kwargs, "device": "meta"})
        elif func in _RANDOM_INIT:
            return args[0] if args else kwargs["tensor"]
        elif func in _INIT_IN_PLACE and args[0].is_meta:
            return args[0]  # initialising a placeholder: nothing to compute (and meta's
            # Python decompositions of random ops cost milliseconds each)
        return func(*args, **kwargs)


def _construct(name: str, checked: dict[str, Any]) -> nn.Module:
    try:
        return _builder(name)(**checked)
    except TypeError as exc:
        # Only translate "this builder does not take that keyword"; other TypeErrors are bugs.
        msg = str(exc)
        if "keyword argument" not in msg:
            raise
        raise ArchitectureError(f"{name} does not accept kwargs {sorted(checked)}: {msg}") from exc


def input_spec(name: str) -> InputSpec:
    """The default input spec for ``name``."""
    _check_name(name)
    if name in CIFAR_NAMES:
        return CIFAR_SPEC
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name.removeprefix(TIMM_PREFIX))
    resize, crop = _TORCHVISION_SIZES.get(name.removeprefix(TORCHVISION_PREFIX), (256, 224))
    return imagenet_spec(resize=resize, crop=crop)


def _timm_spec(model: str) -> InputSpec:
    """timm's own preprocessing for `model`: its input size, crop fraction, mean and std."""
    import timm

    cfg = timm.get_pretrained_cfg(model, allow_unregistered=True)
    if cfg is None:
        return imagenet_spec()
    _, h, w = cfg.input_size
    resize = int(h / (cfg.crop_pct or 0.875))  # timm floors
    return InputSpec(shape=(cfg.input_size[0], h, w), mean=tuple(cfg.mean), std=tuple(cfg.std),
                     resize=resize, crop=h)
