"""The int8 form of each Conv2d / Linear of a plan: folded int8 weight, int32 bias.

The bias is quantized the way QLinearConv adds it to the int32 accumulator: int32 codes with
scale input_scale * weight_scale per output channel (zero point 0). onnxruntime fuses
DQ -> Conv -> Q only when the bias, too, comes from such a DequantizeLinear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from runtime.quant.calibrate import check_scales
from runtime.quant.errors import NoActivationScales, QuantError
from runtime.quant.plan import QuantPlan
from runtime.quant.weights import Int8Weight

__all__ = ["QuantizedLayer", "quantize_layers", "require_scales"]

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer as the QDQ graph holds it; `bias_scale` = float32(input scale * weight
    scale), value of the bias = float32(bias codes) * bias_scale."""

    weight: Int8Weight  # BatchNorm folded in
    input_label: str
    input_scale: float
    bias: np.ndarray | None  # int32 [out channels]
    bias_scale: np.ndarray | None  # float32 [out channels]

    def bias_values(self) -> Tensor | None:
        """float32(codes) * scale, exactly what DequantizeLinear computes."""
        if self.bias is None or self.bias_scale is None:
            return None
        return torch.from_numpy(self.bias.astype(np.float32) * self.bias_scale)


def require_scales(plan: QuantPlan, act_scales: Mapping[str, float]) -> None:
    """Every label of the plan has a usable scale; say clearly when a file predates them."""
    check_scales(act_scales)
    missing = [label for label in plan.scale_labels() if label not in act_scales]
    if missing:
        older = all(label in act_scales for label in plan.inputs.values())
        raise NoActivationScales(
            f"no activation scale for {len(missing)} quantized tensor(s) "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            + ("; these scales cover only layer inputs (packed by an older weightpack), "
               "while int8 now also quantizes layer outputs and residual adds" if older else "")
            + ": re-pack with --calib-data DIR, or calibrate now (--calib-data DIR, "
              "runtime.quant.calibrate)")


def _bias_codes(bias: Tensor, scale: np.ndarray) -> np.ndarray:
    b = bias.detach().to(torch.float64).cpu().numpy().reshape(-1)
    return np.clip(np.rint(b / scale.astype(np.float64)), _INT32.min, _INT32.max).astype(np.int32)


def quantize_layers(plan: QuantPlan, act_scales: Mapping[str, float],
                    weights: Mapping[str, Int8Weight]) -> dict[str, QuantizedLayer]:
    """Module name -> QuantizedLayer for every Conv2d/Linear of the plan."""
    require_scales(plan, act_scales)
    out: dict[str, QuantizedLayer] = {}
    for name, label in plan.inputs.items():
        layer = plan.graph.get_submodule(name)
        if name not in weights:
            raise QuantError(f"no int8 weight for layer {name}")
        w = weights[name]
        if tuple(w.q.shape) != tuple(layer.weight.shape):
            raise QuantError(f"int8 weight of {name} has shape {w.q.shape}, "
                             f"the layer {tuple(layer.weight.shape)}")
        if name in plan.folds:
            w = w.fold(plan.folds[name])
        s_in = np.float32(act_scales[label])
        codes = scale = None
        if layer.bias is not None:
            scale = (s_in * w.scales).astype(np.float32)
            codes = _bias_codes(layer.bias, scale)
        out[name] = QuantizedLayer(w, label, float(s_in), codes, scale)
    return out
