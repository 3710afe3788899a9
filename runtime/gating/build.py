"""Install channel gates in a model: the runtime's reading of a file's gating records, and
the module the packer trains.

Each gated Conv2d gets a ChannelGate child (`<conv>.gate`, so its tensors are
`<conv>.gate.weight` and `.bias` and the conv keeps its own names). The module that calls
the conv (its parent) is traced one level deep with torch.fx, every submodule a leaf, and
rewritten: the gate reads the conv's input, and the conv's output, or the output of the
BatchNorm2d that alone reads it, is multiplied by the gate's mask before anything else
sees it. The rewritten parent replaces the original in place, so every name in the
model's state_dict stays what it was, the model keeps its class and submodules, and
torch.onnx and the int8 plan's fx trace see the gating as ordinary operations.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from runtime.errors import ArchitectureError
from runtime.format.records import ChannelGateRecord
from runtime.gating.gate import GATE_CHILD, ChannelGate

__all__ = ["apply_gates", "gate_points", "gated_convs", "gates_of"]


class _OneLevel(fx.Tracer):
    """Traces only the module's own forward: every submodule is called as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def gated_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> Conv2d of every gated convolution of `model`, in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and isinstance(getattr(m, GATE_CHILD, None), ChannelGate)}


def gates_of(model: nn.Module) -> dict[str, ChannelGate]:
    """Conv name -> its ChannelGate, for every gated convolution of `model`."""
    return {name: getattr(conv, GATE_CHILD) for name, conv in gated_convs(model).items()}


def _check(model: nn.Module, gate: ChannelGateRecord) -> nn.Conv2d:
    modules = dict(model.named_modules())
    conv = modules.get(gate.module) if gate.module else None
    if conv is None:
        raise ArchitectureError(f"channel gate names module {gate.module!r}, which the "
                                "architecture does not have")
    if not isinstance(conv, nn.Conv2d):
        raise ArchitectureError(f"channel gate names {gate.module!r}, a "
                                f"{type(conv).__name__}: only convolutions (Conv2d) are gated")
    if conv.groups != 1:
        raise ArchitectureError(f"channel gate on {gate.module!r}: grouped convolutions "
                                f"(groups={conv.groups}) are not gated")
    if not 1 <= gate.keep <= conv.out_channels:
        raise ArchitectureError(f"channel gate on {gate.module!r} keeps {gate.keep} of "
                                f"{conv.out_channels} channels; it must keep 1 to "
                                f"{conv.out_channels}")
    if GATE_CHILD in conv._modules:
        raise ArchitectureError(f"{gate.module!r} is gated twice, or already has a child "
                                f"named {GATE_CHILD!r}")
    return conv


def _apply_point(graph_module_root: nn.Module, conv_node: fx.Node) -> fx.Node:
    """The BatchNorm2d node that alone reads the conv's output, else the conv node."""
    if len(conv_node.users) != 1:
        return conv_node
    user = next(iter(conv_node.users))
    if (user.op == "call_module"
            and isinstance(graph_module_root.get_submodule(str(user.target)), nn.BatchNorm2d)
            and user.args == (conv_node,) and not user.kwargs):
        return user
    return conv_node


def gate_points(model: nn.Module, convs: Iterable[str]) -> dict[str, str]:
    """Conv name -> name of the module whose output that conv's gate would multiply: the
    BatchNorm2d that alone reads the conv's output, else the conv itself (the rule
    `apply_gates` follows). For the packer, which fits predictors to those outputs."""
    points: dict[str, str] = {}
    traced: dict[str, fx.Graph] = {}
    for name in convs:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if parent_name not in traced:
            try:
                traced[parent_name] = _OneLevel().trace(parent)
            except Exception as exc:  # fx raises many types for dynamic control flow
                raise ArchitectureError(f"cannot gate convolutions of {parent_name or 'the model'}"
                                        f": torch.fx cannot trace its forward "
                                        f"({type(exc).__name__})") from None
        calls = [n for n in traced[parent_name].nodes
                 if n.op == "call_module" and n.target == child]
        point = _apply_point(parent, calls[0]) if len(calls) == 1 else None
        target = str(point.target) if point is not None else child
        points[name] = f"{parent_name}.{target}" if parent_name else target
    return points


def _rewrite_parent(parent: nn.Module, parent_name: str,
                    children: Sequence[str]) -> fx.GraphModule:
    """`parent` traced one level, with the gates of its `children` convs in its graph."""
    label = parent_name or "the model"
    try:
        graph = _OneLevel().trace(parent)
    except Exception as exc:  # fx raises many types for dynamic control flow
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ArchitectureError(f"cannot gate convolutions of {label}: torch.fx cannot trace "
                                f"its forward ({type(exc).__name__}: {first})") from None
    for child in children:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == child]
        full = f"{parent_name}.{child}" if parent_name else child
        if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
            raise ArchitectureError(f"cannot gate {full!r}: {label} calls it {len(calls)} "
                                    "times or not with one tensor; a gate needs one call")
        conv_node = calls[0]
        apply = _apply_point(parent, conv_node)
        with graph.inserting_before(conv_node):
            mask = graph.call_module(f"{child}.{GATE_CHILD}", (conv_node.args[0],))
        with graph.inserting_after(apply):
            gated = graph.call_function(operator.mul, (apply, mask))
        apply.replace_all_uses_with(gated, delete_user_cb=lambda user, g=gated: user is not g)
    rewritten = fx.GraphModule(parent, graph, class_name=type(parent).__name__)
    lost = set(parent.state_dict()) - set(rewritten.state_dict())
    if lost:
        raise ArchitectureError(f"cannot gate convolutions of {label}: its traced forward "
                                f"does not use {sorted(lost)[0]!r}")
    rewritten.train(parent.training)
    return rewritten


def apply_gates(model: nn.Module, gates: Iterable[ChannelGateRecord],
                generator: torch.Generator | None = None) -> nn.Module:
    """Install `gates` in `model` (in place where possible) and return the gated model.

    The returned object is `model` itself unless a gated conv is called by the model's own
    forward (then it is the model's fx rewrite). Predictors are initialised as in the
    reference (nn.Linear's default), from `generator` when given; a file's tensors then
    overwrite them. Refused (ArchitectureError): a gate on a module that is not a Conv2d,
    a grouped conv, keep outside 1..C_out, a conv gated twice, and parents torch.fx cannot
    trace.
    """
    gates = list(gates)
    by_parent: dict[str, list[str]] = {}
    for gate in gates:
        conv = _check(model, gate)
        conv.add_module(GATE_CHILD, ChannelGate(conv.in_channels, conv.out_channels,
                                                gate.keep, generator, conv.weight.device))
        parent, _, child = gate.module.rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    # Deepest parents first: a shallower parent then calls its rewritten children as leaves.
    for parent_name in sorted(by_parent, key=lambda p: -p.count(".") - bool(p)):
        parent = model.get_submodule(parent_name)
        rewritten = _rewrite_parent(parent, parent_name, by_parent[parent_name])
        if not parent_name:
            model = rewritten
            continue
        owner_name, _, attribute = parent_name.rpartition(".")
        setattr(model.get_submodule(owner_name), attribute, rewritten)
    return model
