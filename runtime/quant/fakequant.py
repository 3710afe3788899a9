"""Torch simulation of the int8 QDQ graph, so torch and ONNX Runtime agree.

Each Conv2d/Linear is wrapped: its input goes through QuantizeLinear->DequantizeLinear
(`torch.fake_quantize_per_tensor_affine`, zero point 0, [-128, 127]) and its weight is
replaced by the dequantized int8 weight (float32(q) * scale, as DequantizeLinear computes).
Everything else (BatchNorm, residual adds, pooling) stays float32, as in the QDQ graph.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from runtime.quant.calibrate import ACT_QMAX, ACT_QMIN, QUANTIZED_TYPES, check_scales
from runtime.quant.errors import QuantError
from runtime.quant.weights import Int8Weight

__all__ = ["FakeQuantInput", "fake_quant_module"]


class FakeQuantInput(nn.Module):
    """Fake-quantizes the input of the wrapped layer with one per-tensor scale."""

    def __init__(self, layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, 0, ACT_QMIN, ACT_QMAX)
        return self.layer(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fake_quant_module(module: nn.Module, act_scales: Mapping[str, float],
                      weights: Mapping[str, Int8Weight]) -> nn.Module:
    """A deep copy of `module` (in eval mode) computing what the QDQ graph computes.

    Every Conv2d/Linear must have an activation scale and an int8 weight (keyed by module
    name, as `calibrate` and `quantize_weights` give them).
    """
    check_scales(act_scales)
    qmodule = copy.deepcopy(module).eval()
    layers = [(n, m) for n, m in qmodule.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    missing = [n for n, _ in layers if n not in act_scales or n not in weights]
    if missing:
        raise QuantError(f"no activation scale or int8 weight for layer(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, layer in layers:
        w = weights[name]
        if tuple(w.q.shape) != tuple(layer.weight.shape):
            raise QuantError(f"int8 weight of {name} has shape {w.q.shape}, "
                             f"the layer {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight = nn.Parameter(w.dequantize().to(layer.weight.device),
                                        requires_grad=False)
        _replace(qmodule, name, FakeQuantInput(layer, act_scales[name]))
    return qmodule
