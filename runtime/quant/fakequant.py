"""Torch simulation of the int8 QDQ graph, so torch and onnxruntime agree.

Built from the same plan as the QDQ graph (`runtime.quant.plan`): BatchNorm folded into its
convolution, every Conv2d/Linear holding its dequantized int8 weight (float32(q) * scale, as
DequantizeLinear computes) and its int32-quantized bias, and a `FakeQuant` (QuantizeLinear ->
DequantizeLinear: `torch.fake_quantize_per_tensor_affine`, zero point 0, [-128, 127]) after
every tensor the graph quantizes. What stays float here (ReLU, pooling, slicing) stays float
between DequantizeLinear and QuantizeLinear there; onnxruntime's fused integer kernels
round once where this rounds in float32, so outputs agree to within a step, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from runtime.quant.calibrate import ACT_QMAX, ACT_QMIN
from runtime.quant.layers import QuantizedLayer, quantize_layers
from runtime.quant.plan import QuantPlan, build_plan, insert_after
from runtime.quant.weights import Int8Weight

__all__ = ["FakeQuant", "fake_quant_module", "fake_quant_plan"]


class FakeQuant(nn.Module):
    """Quantizes and dequantizes a tensor with one per-tensor scale (its label's)."""

    def __init__(self, label: str, scale: float) -> None:
        super().__init__()
        self.label = label
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, 0, ACT_QMIN, ACT_QMAX)

    def extra_repr(self) -> str:
        return f"{self.label!r}, scale={self.scale:.6g}"


def fake_quant_plan(module: nn.Module, act_scales: Mapping[str, float],
                    weights: Mapping[str, Int8Weight]
                    ) -> tuple[QuantPlan, dict[str, QuantizedLayer], dict[str, str]]:
    """The plan of `module` with int8 layers and FakeQuant modules in place; also the
    quantized layers and the FakeQuant submodule name -> label (for the ONNX export)."""
    plan = build_plan(module)
    layers = quantize_layers(plan, act_scales, weights)
    for name, q in layers.items():
        layer = plan.graph.get_submodule(name)
        device = layer.weight.device
        with torch.no_grad():
            layer.weight = nn.Parameter(q.weight.dequantize().to(device), requires_grad=False)
            bias = q.bias_values()
            if bias is not None:
                layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    fq = insert_after(plan, lambda _node, label: FakeQuant(label, act_scales[label]))
    return plan, layers, fq


def fake_quant_module(module: nn.Module, act_scales: Mapping[str, float],
                      weights: Mapping[str, Int8Weight]) -> fx.GraphModule:
    """An eval-mode copy of `module` computing what the QDQ graph computes.

    `act_scales` must hold a scale for every label of the plan (as `calibrate` gives them),
    `weights` an int8 weight per Conv2d/Linear module name (as `quantize_weights` does).
    """
    return fake_quant_plan(module, act_scales, weights)[0].graph
