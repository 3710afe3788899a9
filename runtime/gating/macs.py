"""Multiply-accumulates a model executes per image, counted from what it actually kept.

FBS saves compute, not bytes, so the saving is measured rather than assumed: while a model
runs, a MacCounter counts for every image
* a gated Conv2d: kept output channels (the k its gate keeps) x input channels that are
  not all zero x kh x kw x output pixels, plus the predictor's
  C_in x C_out (a suppressed output channel is never computed; an input channel a previous
  gate suppressed is exactly zero and contributes nothing);
* in a model with gates, an ungated, ungrouped Conv2d: all its output channels x input
  channels that are not all zero x kh x kw x output pixels (the conv after a gated one
  reads the suppressed channels as zeros and need not read them at all);
* a Linear, a grouped Conv2d, and every layer of a model without gates: all its MACs (the
  dense count).
This is what the batch-1 path (runtime.gating.skip) executes. ReLU zeroes a whole channel
of an image now and then too, so in a gated model a few of the skipped input channels are
not the gates' doing; the ungated model is not given that credit (its count is dense).
`macs_dense` is the ungated model's count. The gates' other work, mean |x| over the input
(C_in x H x W additions) and the C_out^2 comparisons of the top-k rule, are not MACs; they
are reported beside them as `gate_other_ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from runtime.gating.build import gated_convs
from runtime.gating.gate import GATE_CHILD, ChannelGate, conv_output_size, pool
from runtime.gating.skip import LiveInputConv, SkipConv

__all__ = ["LayerCount", "MacCounter", "conv_output_size", "count_macs"]


@dataclass
class LayerCount:
    """One layer's count over the images it ran on."""

    name: str
    dense: int = 0  # MACs per image without gating
    images: int = 0
    executed: int = 0  # MACs over all images
    other_ops: int = 0  # gate additions and comparisons over all images
    kept: list[Tensor] = field(default_factory=list)  # gated: kept outputs per image
    live_inputs: list[Tensor] = field(default_factory=list)  # convs: non-zero inputs per image
    per_image: list[Tensor] = field(default_factory=list)  # convs: executed MACs per image
    kept_by_channel: Tensor | None = None  # gated: images in which each channel was kept

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"macs_dense": self.dense,
                               "macs_executed": self.executed / max(self.images, 1)}
        if self.kept:
            out["kept_mean"] = float(torch.cat(self.kept).float().mean())
        if self.live_inputs:
            out["live_inputs_mean"] = float(torch.cat(self.live_inputs).float().mean())
        return out


class MacCounter:
    """Context manager: count MACs per image while `model` runs (torch modules only)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, LayerCount] = {}
        self._handles: list[Any] = []
        self._gates: dict[ChannelGate, tuple[str, nn.Conv2d]] = {}

    def __enter__(self) -> MacCounter:
        gated = gated_convs(self.model)
        for name, conv in gated.items():
            gate = getattr(conv, GATE_CHILD)
            self._gates[gate] = (name, conv)
            gate.observer = self._observe_gate
        live_only = bool(gated)
        for name, module in self.model.named_modules():
            plain = (isinstance(module, nn.Conv2d | nn.Linear | LiveInputConv)
                     and not isinstance(module, SkipConv))  # a SkipConv reports as a gate
            if plain and name not in gated:
                self._handles.append(module.register_forward_hook(
                    self._plain_hook(name, live_only)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for gate in self._gates:
            gate.observer = None

    # -- counting -------------------------------------------------------------------------

    def _layer(self, name: str) -> LayerCount:
        return self.layers.setdefault(name, LayerCount(name))

    def _plain_hook(self, name: str, live_only: bool):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            conv = module.conv if isinstance(module, LiveInputConv) else module
            layer = self._layer(name)
            if (live_only and isinstance(conv, nn.Conv2d) and conv.groups == 1
                    and output.dim() == 4):
                kh, kw = conv.kernel_size
                live = (pool(inputs[0]) != 0).sum(dim=1).cpu()
                per_input = conv.out_channels * kh * kw * output.shape[2] * output.shape[3]
                per_image = live * per_input
                layer.dense = conv.in_channels * per_input
                layer.images += output.shape[0]
                layer.executed += int(per_image.sum())
                layer.live_inputs.append(live)
                layer.per_image.append(per_image)
                return
            n = output.shape[0] if output.dim() > 1 else 1
            if isinstance(conv, nn.Conv2d):
                kh, kw = conv.kernel_size
                per_image = (output[0].numel() * (conv.in_channels // conv.groups) * kh * kw)
            else:
                per_image = output.numel() // n * conv.in_features
            layer.dense, layer.images = per_image, layer.images + n
            layer.executed += per_image * n
        return hook

    def _observe_gate(self, gate: ChannelGate, x: Tensor, pooled: Tensor, mask: Tensor) -> None:
        name, conv = self._gates[gate]
        kh, kw = conv.kernel_size
        out_h, out_w = conv_output_size(conv, x.shape[2], x.shape[3])
        pixels = out_h * out_w
        kept = torch.full((x.shape[0],), gate.keep, dtype=torch.int64)
        live = (pooled != 0).sum(dim=1).cpu()
        predictor = conv.in_channels * conv.out_channels
        per_image = kept * live * (kh * kw * pixels) + predictor
        layer = self._layer(name)
        layer.dense = conv.out_channels * conv.in_channels * kh * kw * pixels
        layer.images += x.shape[0]
        layer.executed += int(per_image.sum())
        layer.other_ops += x.shape[0] * (conv.in_channels * x.shape[2] * x.shape[3]
                                         + conv.out_channels ** 2)
        layer.kept.append(kept)
        layer.live_inputs.append(live)
        layer.per_image.append(per_image)
        hits = (mask != 0).sum(dim=0).cpu()
        layer.kept_by_channel = hits if layer.kept_by_channel is None else (
            layer.kept_by_channel + hits)

    # -- results ---------------------------------------------------------------------------

    @property
    def images(self) -> int:
        return max((layer.images for layer in self.layers.values()), default=0)

    def per_image(self) -> Tensor:
        """Executed MACs of each image, in the order the images ran."""
        images = self.images
        total = torch.zeros(images, dtype=torch.int64)
        for layer in self.layers.values():
            if layer.per_image:
                counts = torch.cat(layer.per_image)
                if counts.numel() != images:
                    raise RuntimeError(f"{layer.name} ran on {counts.numel()} of {images} "
                                       "images; per-image counts need one call per image")
                total += counts
            else:
                total += layer.dense
        return total

    def summary(self) -> dict[str, Any]:
        """macs_dense, macs_executed (mean per image), their ratio, and the gates' share."""
        images = self.images
        silent = [name for name, _ in self._gates.values() if name not in self.layers]
        if images and silent:
            raise RuntimeError(f"the gate of {silent[0]} never ran as a module (a traced "
                               "copy?); count MACs on the module runtime.load returns")
        dense = sum(layer.dense for layer in self.layers.values())
        executed = sum(layer.executed for layer in self.layers.values()) / max(images, 1)
        predictors = sum(conv.in_channels * conv.out_channels
                         for _, conv in self._gates.values())
        other = sum(layer.other_ops for layer in self.layers.values()) / max(images, 1)
        return {"macs_dense": dense, "macs_executed": round(executed, 1),
                "macs_ratio": round(executed / dense, 6) if dense else math.nan,
                "macs_gates": predictors, "gate_other_ops": round(other, 1),
                "gated_layers": len(self._gates), "macs_images": images}

    def gated_layers(self) -> dict[str, LayerCount]:
        return {name: self.layers[name] for name, _ in self._gates.values() if name in self.layers}


def count_macs(model: nn.Module, images: Tensor) -> dict[str, Any]:
    """The summary of one forward pass of `model` over `images`."""
    with MacCounter(model) as counter, torch.inference_mode():
        model.eval()(images)
    return counter.summary()
