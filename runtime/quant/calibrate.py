"""Per-tensor int8 scales for every tensor int8 inference quantizes, from sample images.

The tensors are the plan's (`runtime.quant.plan`: the inputs of every Conv2d / Linear, the
outputs of every Conv2d with its BatchNorm folded in, the inputs and outputs of residual
adds). An observer placed after each one keeps only a histogram of |x| (no activations are
stored), so memory stays bounded however many images are used. The histogram has a fixed
number of bins whose width doubles (merging neighbour pairs) whenever a larger value
arrives, so the range never has to be known in advance.

Scales are symmetric (zero point 0, int8 activations in [-128, 127]): scale = amax / 127,
with amax chosen by `minmax` (largest |x|), `percentile` (that percentile of |x|) or `mse`
(the clipping threshold with the least expected squared quantization error).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from runtime.quant.errors import CalibrationError, QuantError
from runtime.quant.plan import QUANTIZED_TYPES, build_plan, insert_after

__all__ = ["ACT_QMAX", "ACT_QMIN", "METHODS", "QUANTIZED_TYPES", "AbsHistogram", "calibrate",
           "check_scales", "scale_from_amax"]

ACT_QMIN, ACT_QMAX = -128, 127
METHODS = ("percentile", "minmax", "mse")
BINS = 4096
MSE_CANDIDATES = 512


def check_scales(act_scales: Mapping[str, float]) -> None:
    """Refuse scales a QuantizeLinear cannot use (from a hand-edited file or dict)."""
    bad = [n for n, v in act_scales.items()
           if not isinstance(v, int | float) or not np.isfinite(v) or v <= 0]
    if bad:
        raise CalibrationError(f"activation scale(s) must be finite and > 0: {', '.join(bad[:5])}")


def scale_from_amax(amax: float) -> float:
    """amax / 127, rounded to float32 (ONNX stores scales as float32; torch then agrees)."""
    return float(np.float32(amax / ACT_QMAX)) if amax > 0 else 1.0


class AbsHistogram:
    """Histogram of |x| over [0, bins * width), width doubled to fit larger values."""

    def __init__(self, bins: int = BINS) -> None:
        self.counts = np.zeros(bins, dtype=np.float64)
        self.width = 0.0
        self.amax = 0.0

    def add(self, x: Tensor) -> None:
        a = x.detach().abs().reshape(-1).float()
        peak = float(a.max()) if a.numel() else 0.0
        if not np.isfinite(peak):
            raise CalibrationError("calibration saw a non-finite activation")
        self.amax = max(self.amax, peak)
        bins = self.counts.size
        if self.width == 0.0:
            if peak == 0.0:  # all zeros so far: count them in bin 0, range still unknown
                self.counts[0] += a.numel()
                return
            self.width = peak / bins * (1 + 1e-6)
        while self.amax >= self.width * bins:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([merged, np.zeros(bins - merged.size)])
            self.width *= 2
        idx = torch.clamp((a / self.width).long(), 0, bins - 1)
        self.counts += torch.bincount(idx, minlength=bins).double().numpy()

    def percentile_amax(self, percentile: float) -> float:
        total = self.counts.sum()
        if total == 0 or self.width == 0.0:
            return self.amax
        cdf = np.cumsum(self.counts) / total
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return min(self.amax, (i + 1) * self.width)

    def mse_amax(self) -> float:
        """Threshold minimising sum(count * error^2) over bin centres, errors of the
        symmetric int8 grid (rounding inside, clipping at 127 * scale outside)."""
        if self.width == 0.0:
            return self.amax
        centres = (np.arange(self.counts.size) + 0.5) * self.width
        used = self.counts > 0
        c, n = centres[used], self.counts[used]
        cands = np.linspace(self.amax / MSE_CANDIDATES, self.amax, MSE_CANDIDATES)
        best, best_err = self.amax, np.inf
        for chunk in np.array_split(cands, max(1, cands.size // 64)):
            s = chunk[:, None] / ACT_QMAX
            deq = np.minimum(np.rint(c[None, :] / s), ACT_QMAX) * s
            err = ((deq - c[None, :]) ** 2 * n[None, :]).sum(axis=1)
            k = int(np.argmin(err))
            if err[k] < best_err:
                best, best_err = float(chunk[k]), float(err[k])
        return best


def _images(batch: Any) -> Tensor:
    """Accept bare tensors as well as (images, targets[, skipped]) loader batches."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise CalibrationError(f"a calibration batch must be a tensor of images, got {type(batch)}")


class Observer(nn.Module):
    """Passes its input through, adding it to a histogram."""

    def __init__(self) -> None:
        super().__init__()
        self.hist = AbsHistogram()

    def forward(self, x: Tensor) -> Tensor:
        self.hist.add(x)
        return x


def calibrate(module: nn.Module, batches: Iterable[Any], method: str = "percentile",
              percentile: float = 99.99) -> dict[str, float]:
    """Scale of every tensor int8 inference quantizes, keyed by its label
    (`runtime.quant.plan`; the input of a layer is keyed by the layer's module name).

    `module` should hold the weights that will be deployed (the decoded ones), so the
    activations measured are the ones int8 inference sees; it is not modified.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; "
                               f"choose from {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile must be in (0, 100], not {percentile}")
    if not any(isinstance(m, QUANTIZED_TYPES) for m in module.modules()):
        raise CalibrationError("the model has no Conv2d or Linear layer to calibrate")
    try:
        plan = build_plan(module)
    except QuantError as exc:
        raise CalibrationError(str(exc)) from None
    observers: dict[str, Observer] = {}

    def observe(node: str, label: str) -> Observer | None:
        if node not in plan.defining:
            return None  # reuses the scale of the tensor it was sliced / pooled from
        observers[label] = Observer()
        return observers[label]

    insert_after(plan, observe, prefix="observer")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    seen = 0
    with torch.inference_mode():
        for batch in batches:
            images = _images(batch)
            if images.numel() == 0:
                continue
            plan.graph(images.to(device))
            seen += images.shape[0]
    if seen == 0:
        raise CalibrationError("calibration data yielded no images")
    out: dict[str, float] = {}
    for label, obs in observers.items():
        h = obs.hist
        if method == "minmax":
            amax = h.amax
        elif method == "percentile":
            amax = h.percentile_amax(percentile)
        else:
            amax = h.mse_amax()
        out[label] = scale_from_amax(amax)
    return out
