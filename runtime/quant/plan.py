"""Which tensors int8 inference quantizes, found on the model's torch.fx graph.

onnxruntime (like TensorRT) runs a layer in int8 only when everything around it is quantized:
DequantizeLinear -> Conv -> QuantizeLinear fuses into QLinearConv, DQ -> Add -> Q into
QLinearAdd. So, with each BatchNorm folded into the convolution before it, we quantize
* the input of every Conv2d / Linear,
* the output of every Conv2d,
* both inputs and the output of every residual add,
each tensor once, for all its consumers. The torch fake-quant module and the ONNX QDQ graph
are both built from this one plan, which is what keeps them computing the same thing.

Each quantized tensor has a label, the key of its scale (`ActivationScale.module` in a file):
* the name of the first Conv2d / Linear it feeds (`layer1.0.conv1`), as files always had;
* `<conv>:out` for a convolution output that feeds no layer directly (`layer1.0.conv2:out`);
* `<module>/<op>` for any other output (`layer1.0/add`, a second one `layer1.0/add.1`).
A tensor that only slices, pads, pools or reshapes a quantized tensor reuses its label: its
values are already on that grid, so quantizing it again with the same scale changes nothing.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from runtime.activation_quant import activation_quantized
from runtime.quant.errors import QuantError

__all__ = ["QUANTIZED_TYPES", "QuantPlan", "build_plan", "insert_after"]

QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)
_ADDS = (operator.add, operator.iadd, torch.add)
_SAME_GRID_MODULES = (nn.Identity, nn.MaxPool2d, nn.Flatten, nn.Dropout)
_SAME_GRID_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, F.max_pool2d)
_SAME_GRID_METHODS = ("view", "reshape", "flatten", "contiguous")


@dataclass
class QuantPlan:
    """A traced eval-mode copy of a model with BatchNorm folded, and where to quantize it."""

    graph: fx.GraphModule  # fp32; folded Conv2d modules replace conv + BatchNorm
    labels: dict[str, str]  # fx node name -> scale label, every quantized tensor, graph order
    defining: set[str]  # the nodes whose own values set their label's scale (calibrated)
    inputs: dict[str, str]  # Conv2d/Linear module name -> label of its input
    folds: dict[str, np.ndarray] = field(default_factory=dict)  # conv -> BN factor per channel

    def scale_labels(self) -> list[str]:
        """Every label a full set of activation scales must hold, in graph order."""
        return list(dict.fromkeys(self.labels[n] for n in self.labels if n in self.defining))


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types for dynamic control flow
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise QuantError(f"int8 needs a model torch.fx can trace; this one cannot be "
                         f"({type(exc).__name__}: {first})") from None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _fold_batchnorms(gm: fx.GraphModule) -> dict[str, np.ndarray]:
    """Fold every eval-mode BatchNorm2d that alone reads a Conv2d into that conv.

    w' = w * f and b' = (b - mean) * f + beta with f = gamma / sqrt(var + eps) per output
    channel; f is returned so int8 weights can be folded the same way (codes kept, scales
    times |f|).
    """
    folds: dict[str, np.ndarray] = {}
    for node in list(gm.graph.nodes):
        conv = _module(gm, node)
        if not isinstance(conv, nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = _module(gm, user)
        if (not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None
                or bn.running_var is None or user.args[0] is not node or len(user.args) != 1):
            continue
        with torch.no_grad():
            factor = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                factor = factor * bn.weight.float()
            bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(factor)
            bias = (bias - bn.running_mean.float()) * factor
            if bn.bias is not None:
                bias = bias + bn.bias.float()
            folded = copy.deepcopy(conv)
            view = (-1,) + (1,) * (conv.weight.dim() - 1)
            folded.weight = nn.Parameter(conv.weight * factor.reshape(view).to(conv.weight),
                                         requires_grad=False)
            folded.bias = nn.Parameter(bias.to(conv.weight), requires_grad=False)
        gm.add_submodule(node.target, folded)
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        folds[node.target] = factor.cpu().numpy().astype(np.float32)
    return folds


def _is_add(node: fx.Node) -> bool:
    two = len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])
    if node.op == "call_function" and node.target in _ADDS:
        return two
    return node.op == "call_method" and node.target in ("add", "add_") and two


def _same_grid_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of a slice / zero pad / max pool / reshape, else None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_module" and isinstance(_module(gm, node), _SAME_GRID_MODULES):
        return first
    if node.op == "call_method" and node.target in _SAME_GRID_METHODS:
        return first
    if node.op == "call_function":
        if node.target in _SAME_GRID_FUNCTIONS:
            return first
        if node.target is F.pad:  # zero padding only
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            return first if mode == "constant" and value in (None, 0, 0.0) else None
    return None


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return {"iadd": "add"}.get(name, name)
    return str(node.target)


def build_plan(module: nn.Module) -> QuantPlan:
    """Trace an eval-mode copy of `module`, fold its BatchNorms and place the quantizers."""
    stored = activation_quantized(module)
    if stored:
        # torch.fx drops forward hooks, and the plan's int8 grid would replace the stored
        # one anyway: refuse rather than run a model other than the one that was trained.
        raise QuantError(f"int8 inference (--int8: QDQ graph or fake-quant) cannot apply the "
                         f"model's own activation quantization (feature 'activation_quant', "
                         f"on the inputs of {stored[0]} and {len(stored) - 1} more layers); "
                         f"run it without --int8")
    gm = _trace(copy.deepcopy(module).eval())
    folds = _fold_batchnorms(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    nodes = list(gm.graph.nodes)
    layers = [n for n in nodes if isinstance(_module(gm, n), QUANTIZED_TYPES)]
    if not layers:
        raise QuantError("the model has no Conv2d or Linear layer to quantize")
    seen: set[str] = set()
    feeds: dict[str, str] = {}  # node -> first layer it is the input of
    for layer in layers:
        if layer.target in seen:
            raise QuantError(f"layer {layer.target} is called more than once; int8 needs one "
                             "call per layer")
        seen.add(layer.target)
        if not layer.args or not isinstance(layer.args[0], fx.Node):
            raise QuantError(f"layer {layer.target} has no tensor input")
        feeds.setdefault(layer.args[0].name, layer.target)
    points: set[str] = set(feeds)
    points.update(n.name for n in layers if isinstance(_module(gm, n), nn.Conv2d))
    for node in nodes:
        if _is_add(node):
            points.update({node.name, node.args[0].name, node.args[1].name})
    labels: dict[str, str] = {}
    defining: set[str] = set()
    taken: set[str] = set()
    for node in nodes:
        if node.name not in points:
            continue
        source = _same_grid_source(gm, node)
        while source is not None and source.name not in labels:
            source = _same_grid_source(gm, source)
        if node.name not in feeds and source is not None:
            labels[node.name] = labels[source.name]
            continue
        if node.name in feeds:
            label = feeds[node.name]
        elif node.op == "call_module":
            label = f"{node.target}:out"
        elif node.op == "placeholder":
            label = f"{node.target}:in"
        else:
            label = f"{_scope(node)}/{_op_name(node)}"
        label = _unique(label, taken)
        taken.add(label)
        labels[node.name] = label
        defining.add(node.name)
    inputs = {n.target: labels[n.args[0].name] for n in layers}
    return QuantPlan(gm, labels, defining, inputs, folds)


def _unique(label: str, taken: set[str]) -> str:
    if label not in taken:
        return label
    k = 1
    while f"{label}.{k}" in taken:
        k += 1
    return f"{label}.{k}"


def insert_after(plan: QuantPlan, make: Callable[[str, str], nn.Module | None],
                 prefix: str = "act_quant") -> dict[str, str]:
    """Put `make(node name, label)` (a module, or None to skip) after every quantized tensor
    of `plan.graph`, in place, so all its consumers read the module's output; returns the new
    submodule name -> label."""
    gm = plan.graph
    by_name = {n.name: n for n in gm.graph.nodes}
    added: dict[str, str] = {}
    for i, (name, label) in enumerate(plan.labels.items()):
        mod = make(name, label)
        if mod is None:
            continue
        node = by_name[name]
        target = f"{prefix}_{i}"
        gm.add_submodule(target, mod)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        added[target] = label
    gm.recompile()
    return added
