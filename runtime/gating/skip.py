"""Inference graphs for latency: BatchNorm folded, and a path that really skips channels.

`inference_graph(model)` traces an eval-mode copy of `model` (gates as leaves) and folds
every BatchNorm2d that alone reads a Conv2d into it (torch's `fuse_conv_bn_eval`), so a
dense and a gated model are timed in the same form. With `skip=True` every gated conv
(with its BatchNorm folded in) becomes a `SkipConv`, which per image computes the mask,
gathers the filters of the kept output channels restricted to the input channels that are
not all zero, convolves only those, scales them by their saliency and scatters them into a
zero output; every other ungrouped Conv2d of a gated model becomes a `LiveInputConv`, which
per image reads only the input channels that are not all zero (those a gate upstream
suppressed). Both compute what the masked graph computes (to float rounding) while doing
the MACs `MacCounter` counts; the gathers, the scatter and the small per-image ops are the
overhead they pay for that.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from runtime.errors import ArchitectureError
from runtime.gating.gate import GATE_CHILD, ChannelGate, conv_output_size, pool, predict

__all__ = ["LiveInputConv", "SkipConv", "inference_graph"]


def _skippable(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding,
                                                                                 str)


class LiveInputConv(nn.Module):
    """An ungated Conv2d (BatchNorm folded in) that reads, image by image, only the input
    channels that are not all zero: a gate upstream suppressed them (a batch-1 kernel)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not _skippable(conv):
            raise ArchitectureError("the channel-skipping path needs an ungrouped convolution "
                                    "with numeric zero padding")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.conv = conv  # for its geometry only
        self.out_channels = conv.out_channels

    def _rows(self, x: Tensor, pooled: Tensor, kept: Tensor | None) -> list[Tensor]:
        """Per image: the output channels `kept[n]` (None: all), from the live inputs."""
        conv = self.conv
        height, width = conv_output_size(conv, x.shape[2], x.shape[3])
        rows = []
        for n in range(x.shape[0]):
            weight = self.weight if kept is None else self.weight.index_select(0, kept[n])
            bias = self.bias if kept is None else self.bias.index_select(0, kept[n])
            live = torch.nonzero(pooled[n]).squeeze(1)
            if live.numel():
                rows.append(F.conv2d(x[n:n + 1].index_select(1, live),
                                     weight.index_select(1, live), bias, conv.stride,
                                     conv.padding, conv.dilation))
            else:  # every input channel is zero: the output is the bias
                rows.append(bias.view(1, -1, 1, 1).expand(1, bias.numel(), height, width))
        return rows

    def forward(self, x: Tensor) -> Tensor:
        rows = self._rows(x, pool(x), None)
        return torch.cat(rows) if len(rows) > 1 else rows[0]


class SkipConv(LiveInputConv):
    """A gated Conv2d (BatchNorm folded in) that computes only the kept output channels
    from the live input channels, image by image (a batch-1 kernel: N > 1 loops)."""

    def __init__(self, conv: nn.Conv2d, gate: ChannelGate) -> None:
        super().__init__(conv)
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        pooled = pool(x)
        saliencies = predict(pooled, self.gate.weight, self.gate.bias)
        # A stable descending sort keeps, of equal saliencies, the lower channel first: the
        # same k channels as the rank rule (keep_top_k), in one operation per image.
        kept = torch.sort(saliencies, dim=1, descending=True, stable=True).indices[
            :, :self.gate.keep]
        if self.gate.observer is not None:  # a MAC counter: show it the mask it counts
            self.gate.observer(self.gate, x, pooled, self.gate.mask(pooled))
        rows = []
        for n, y in enumerate(self._rows(x, pooled, kept)):
            out = y.new_zeros(1, self.out_channels, y.shape[2], y.shape[3])
            out.index_copy_(1, kept[n], y * saliencies[n].index_select(0, kept[n]).view(
                1, -1, 1, 1))
            rows.append(out)
        return torch.cat(rows) if len(rows) > 1 else rows[0]


class _GatesAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelGate | LiveInputConv) or super().is_leaf_module(
            m, module_qualified_name)


def _fold_batchnorms(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = gm.get_submodule(str(node.target))
        user = next(iter(node.users))
        if not isinstance(conv, nn.Conv2d) or user.op != "call_module":
            continue
        bn = gm.get_submodule(str(user.target))
        if not isinstance(bn, nn.BatchNorm2d) or user.args != (node,) or user.kwargs:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        gate = conv._modules.get(GATE_CHILD)
        if gate is not None:
            fused.add_module(GATE_CHILD, gate)
        gm.add_submodule(str(node.target), fused)
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)


def _skip_gated(gm: fx.GraphModule) -> int:
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.mul or len(node.args) != 2:
            continue
        source, gate_node = node.args
        if not (isinstance(gate_node, fx.Node) and gate_node.op == "call_module"
                and isinstance(gm.get_submodule(str(gate_node.target)), ChannelGate)):
            continue
        conv_target = str(gate_node.target).removesuffix(f".{GATE_CHILD}")
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and source.target == conv_target):
            raise ArchitectureError(f"the gate of {conv_target} does not multiply its "
                                    "convolution's output directly after folding")
        conv = gm.get_submodule(conv_target)
        gm.add_submodule(conv_target, SkipConv(conv, conv._modules[GATE_CHILD]))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        gm.graph.erase_node(gate_node)
        replaced += 1
    return replaced


def _skip_dead_inputs(gm: fx.GraphModule) -> None:
    """Every other ungrouped conv of a gated model reads only its live input channels."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            conv = gm.get_submodule(str(node.target))
            if type(conv) is nn.Conv2d and _skippable(conv):
                gm.add_submodule(str(node.target), LiveInputConv(conv))


def inference_graph(model: nn.Module, skip: bool = False) -> fx.GraphModule:
    """An eval-mode, BatchNorm-folded copy of `model`; with `skip`, gated convs skip the
    channels their gates suppress (see the module docstring). The original is untouched."""
    model = copy.deepcopy(model).eval()
    tracer = _GatesAsLeaves()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types for dynamic control flow
        raise ArchitectureError(f"torch.fx cannot trace the model ({type(exc).__name__})") \
            from None
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    with torch.no_grad():
        _fold_batchnorms(gm)
        if skip and _skip_gated(gm):
            _skip_dead_inputs(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
