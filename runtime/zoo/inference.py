"""Architecture inference: which allow-listed models have exactly a state_dict's tensors.

Candidates are built *shape-only* (parameters on the meta device, weight init skipped), so no
memory is used and a model costs milliseconds. To stay fast over ~80 architectures, one member
per family is built first and only families whose top-level module names and classifier keys
match the state_dict are examined member by member. ``num_batches_tracked`` buffers are
ignored: whether they exist depends on the PyTorch version that saved a checkpoint, not on
the architecture.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from runtime.errors import ArchitectureError
from runtime.zoo.registry import BUILDERS, TIMM_PREFIX, build, family

__all__ = ["infer", "infer_one", "infer_with_kwargs", "match", "shapes_of"]

Shapes = dict[str, tuple[int, ...]]

_FACTORIES: frozenset[Callable[..., Tensor]] = frozenset(
    {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}
)
_IGNORED_SUFFIX = ".num_batches_tracked"


class _ShapeOnlyMode(TorchFunctionMode):
    """Route tensor factories to the meta device and skip in-place ops on meta tensors.

    Unlike ``torch.device("meta")`` this leaves other tensor arithmetic on the CPU, which some
    builders need (RegNet computes its widths with ``.tolist()``).
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            return func(*args, **{**kwargs, "device": "meta"})
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            # torch.nn.init functions pass their tensor by keyword.
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor  # weight initialisation: shapes are unchanged
        return func(*args, **kwargs)


def _clean(shapes: Mapping[str, tuple[int, ...]]) -> Shapes:
    return {k: v for k, v in shapes.items() if not k.endswith(_IGNORED_SUFFIX)}


@functools.lru_cache(maxsize=512)
def _cached_shapes(name: str, num_classes: int | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with warnings.catch_warnings(), _ShapeOnlyMode():
        # googlenet/inception warn about their default init, which shape-only builds skip.
        warnings.simplefilter("ignore", FutureWarning)
        model = build(name, kwargs)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def shapes_of(name: str, num_classes: int | None = None) -> Shapes:
    """``{key: shape}`` of the state_dict ``name`` would have, without allocating it."""
    if name not in BUILDERS and not name.startswith(TIMM_PREFIX):
        raise ArchitectureError(f"unknown architecture {name!r}")
    return _clean(dict(_cached_shapes(name, num_classes)))


def _top_level(keys: Any) -> frozenset[str]:
    return frozenset(k.split(".", 1)[0] for k in keys)


@dataclass(frozen=True)
class _Signature:
    """What all members of a family share: top-level module names and the head's tensors.

    The head is the last top-level module of the family's representative (its classifier);
    its key names and ranks do not depend on depth or width, so comparing them rules out
    most families that merely share names such as ``features``/``classifier``.
    """

    top: frozenset[str]
    head: str
    head_keys: frozenset[tuple[str, int]]

    @classmethod
    def of(cls, shapes: Shapes) -> _Signature:
        head = next(reversed(shapes)).split(".", 1)[0]
        return cls(_top_level(shapes), head, _head_keys(shapes, head))

    def admits(self, target: Shapes) -> bool:
        return _top_level(target) == self.top and _head_keys(target, self.head) == self.head_keys


def _head_keys(shapes: Shapes, head: str) -> frozenset[tuple[str, int]]:
    return frozenset((k, len(s)) for k, s in shapes.items() if k.split(".", 1)[0] == head)


# Cheap members to stand for their family (any member would do; these build fastest).
_PREFERRED_REPRESENTATIVES = frozenset(
    "torchvision." + n
    for n in (
        "convnext_tiny", "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18",
        "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "vit_b_32",
    )
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _families() -> dict[str, tuple[str, ...]]:
    """Family -> members, the representative first."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in BUILDERS:
        groups[family(name)].append(name)
    return {
        fam: tuple(sorted(members, key=lambda n: n not in _PREFERRED_REPRESENTATIVES))
        for fam, members in groups.items()
    }


@functools.lru_cache(maxsize=64)
def _family_signature(fam: str) -> _Signature | None:
    """The family's signature (from its representative); None if it cannot be built."""
    try:
        return _Signature.of(shapes_of(_families()[fam][0]))
    except Exception:  # noqa: BLE001 - a builder that fails shape-only is simply not inferable
        return None


def _match(name: str, target: Shapes) -> dict[str, Any] | None:
    """Builder kwargs that make ``name`` match ``target`` exactly, or None."""
    ref = shapes_of(name)
    if ref.keys() != target.keys():
        return None
    diff = [k for k in ref if ref[k] != target[k]]
    if not diff:
        return {}
    # Only the classifier may differ: every differing tensor must differ in dim 0 alone and
    # agree on one class count, which is then confirmed by a rebuild.
    classes = set()
    for k in diff:
        a, b = ref[k], target[k]
        if len(a) != len(b) or not a or a[1:] != b[1:]:
            return None
        classes.add(b[0])
    if len(classes) != 1:
        return None
    num_classes = classes.pop()
    if shapes_of(name, num_classes) != target:
        return None
    return {"num_classes": num_classes}


def _target_shapes(state_dict: Mapping[str, Tensor]) -> Shapes:
    if not isinstance(state_dict, Mapping):
        raise ArchitectureError(f"expected a state_dict mapping, got {type(state_dict).__name__}")
    shapes: Shapes = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ArchitectureError(f"state_dict entry {key!r} is not a named tensor")
        shapes[key] = tuple(value.shape)
    return _clean(shapes)


def infer_with_kwargs(state_dict: Mapping[str, Tensor]) -> list[tuple[str, dict[str, Any]]]:
    """Every allow-listed architecture (with the kwargs it needs) matching ``state_dict``."""
    target = _target_shapes(state_dict)
    found: list[tuple[str, dict[str, Any]]] = []
    for fam, members in _families().items():
        signature = _family_signature(fam)
        if signature is None or not signature.admits(target):
            continue
        for name in members:
            try:
                kwargs = _match(name, target)
            except Exception:  # noqa: BLE001 - e.g. a class count the builder rejects
                kwargs = None
            if kwargs is not None:
                found.append((name, kwargs))
    return found


def match(name: str, state_dict: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Builder kwargs that make ``name`` hold exactly ``state_dict``'s tensors, or None."""
    target = _target_shapes(state_dict)
    try:
        return _match(name, target)
    except Exception:  # noqa: BLE001 - a builder that rejects the class count does not match
        return None


def infer(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Names of the architectures whose parameter/buffer names and shapes match exactly."""
    return [name for name, _ in infer_with_kwargs(state_dict)]


def infer_one(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """The single matching architecture and its kwargs; ArchitectureError if none or several."""
    found = infer_with_kwargs(state_dict)
    if len(found) != 1:
        what = "no allow-listed architecture" if not found else f"{len(found)} architectures"
        listed = f" ({', '.join(n for n, _ in found)})" if found else ""
        raise ArchitectureError(
            f"{what}{listed} match the checkpoint's tensor names and shapes; name one explicitly"
        )
    return found[0]
