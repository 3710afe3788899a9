"""Pick the allow-listed architecture a state_dict belongs to, and build it loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime import zoo
from runtime.errors import ArchitectureError

GRAPH = "graph"  # --arch value: store the model's own graph instead of a zoo builder


@dataclass(frozen=True)
class ResolvedArchitecture:
    name: str  # zoo builder name, or GRAPH
    kwargs: dict[str, Any]
    model: nn.Module  # eval mode, source weights loaded

    @property
    def kind(self) -> str:
        return "onnx_graph" if self.name == GRAPH else "builder"


def _last_linear(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


# BatchNorm buffer added in PyTorch 0.4.1: older checkpoints (the original CIFAR ResNets) lack
# it, and torch's own strict load_state_dict fills it in, so its absence is no mismatch.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def _mismatches(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected
                if k not in state_dict and not k.endswith(_OPTIONAL_SUFFIX)]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and v.shape != state_dict[k].shape]
    return problems


def build_loaded(name: str, state_dict: dict[str, torch.Tensor]) -> ResolvedArchitecture:
    """Build `name`, adapting num_classes to the checkpoint's classifier, and load strictly."""
    kwargs: dict[str, Any] = {}
    model = zoo.build(name, kwargs)
    head = _last_linear(model)
    if head and f"{head}.weight" in state_dict:
        classes = int(state_dict[f"{head}.weight"].shape[0])
        if classes != int(model.get_submodule(head).out_features):
            kwargs = {"num_classes": classes}
            model = zoo.build(name, kwargs)
    problems = _mismatches(model, state_dict)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                           if len(problems) > 3 else "")
        raise ArchitectureError(f"checkpoint does not match architecture {name}: {shown}")
    fresh = model.state_dict()  # a missing num_batches_tracked keeps the builder's 0
    model.load_state_dict({**{k: v for k, v in fresh.items() if k.endswith(_OPTIONAL_SUFFIX)},
                           **state_dict}, strict=True)
    return ResolvedArchitecture(name, kwargs, model.eval())


def resolve(state_dict: dict[str, torch.Tensor], arch: str | None,
            module: nn.Module | None = None) -> ResolvedArchitecture:
    """A zoo architecture when one matches; else, for a checkpoint that carries its own
    module (TorchScript, or a trusted pickle), that module, to be stored as a graph."""
    if arch == GRAPH or (arch is None and module is not None
                         and not zoo.infer_with_kwargs(state_dict)):
        if module is None:
            raise ArchitectureError("--arch graph needs a checkpoint that holds the model "
                                    "itself (TorchScript, or a pickled model with "
                                    "--trust-pickle)")
        return ResolvedArchitecture(GRAPH, {}, module.eval())
    if arch is not None:
        return build_loaded(zoo.resolve_name(arch, state_dict), state_dict)
    candidates = [name for name, _ in zoo.infer_with_kwargs(state_dict)]
    if len(candidates) == 1:
        return build_loaded(candidates[0], state_dict)
    if not candidates:
        raise ArchitectureError(
            "no known architecture matches this checkpoint's tensor names and shapes; "
            "pass --arch NAME (see `packer archs`), or give a TorchScript file so its "
            "graph can be stored")
    raise ArchitectureError(f"several architectures match this checkpoint: "
                            f"{', '.join(candidates)}; pass --arch NAME to pick one")
