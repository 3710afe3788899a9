"""`uniform` and `int8`: symmetric uniform grids, per output channel or per layer.

The grid is value = code * scale with codes in [-(2^(b-1)-1), 2^(b-1)-1] (zero point 0:
TensorRT's rule at 8 bits). `clip` picks the scale: `max` maps the largest magnitude to the
top code; `mse` searches clipping ratios for the smallest squared error per channel, which
trades a few clipped outliers for finer steps everywhere else.

Because codes are entropy-coded, rounding to the nearest level is not the best use of bits:
`rdo` > 0 turns on rate-distortion optimised rounding (as in NNCodec/HEVC's RDOQ), which
picks between the two levels around each weight to minimise
(error / step)^2 + rdo * bits(level), with bits from the layer's own code histogram.
"""

from __future__ import annotations

from typing import Any

import torch

from packer.config import Option
from packer.methods.base import PerTensorMethod
from runtime.quant.grid import max_scales, round_to_grid
from runtime.tensors import UniformTensor

MSE_RATIOS = torch.linspace(0.5, 1.0, 51)


def _bits_ok(b: int) -> str | None:
    return None if 2 <= b <= 8 else "bits must be between 2 and 8"


def _step_ok(s: float | None) -> str | None:
    return None if s is None or s > 0 else "step must be positive"


def _rdo_ok(lam: float) -> str | None:
    return None if 0 <= lam <= 10 else "rdo must be between 0 and 10"


def _channel_view(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def _mse_scales(rows: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared error of every candidate clipping ratio, per row; keep the best ratio.
    Rows go in chunks so the rows x ratios x columns temporary stays near 64 MB."""
    peak = rows.abs().amax(dim=1)
    cands = peak[:, None] * MSE_RATIOS[None, :] / qmax  # rows x R
    safe = torch.where(cands > 0, cands, torch.ones_like(cands))
    best = torch.empty_like(peak)
    chunk = max(1, (1 << 24) // (len(MSE_RATIOS) * rows.shape[1]))
    for start in range(0, rows.shape[0], chunk):
        r, c = rows[start : start + chunk], safe[start : start + chunk]
        q = torch.clamp(torch.round(r[:, None, :] / c[:, :, None]), -qmax, qmax)
        err = ((q * c[:, :, None] - r[:, None, :]) ** 2).sum(dim=2)
        best[start : start + chunk] = c.gather(1, err.argmin(1, keepdim=True)).squeeze(1)
    return torch.where(peak > 0, best, torch.ones_like(best))  # all-zero rows: scale 1


def rdo_round(scaled: torch.Tensor, codes: torch.Tensor, qmax: int, lam: float,
              iters: int = 3) -> torch.Tensor:
    """Re-round `scaled` (weights / step) to floor or ceil, trading squared error (in steps)
    against lam x the code's cost in bits under the current histogram; a few passes let
    the histogram and the choices settle."""
    lo = torch.clamp(torch.floor(scaled), -qmax, qmax)
    hi = torch.clamp(lo + 1, -qmax, qmax)
    for _ in range(iters):
        counts = torch.bincount((codes + qmax).reshape(-1).long(), minlength=2 * qmax + 1)
        cost = -torch.log2((counts.double() + 0.5) / (counts.sum() + 0.5 * counts.numel()))
        c_lo = (scaled - lo) ** 2 + lam * cost[(lo + qmax).long()].float()
        c_hi = (scaled - hi) ** 2 + lam * cost[(hi + qmax).long()].float()
        codes = torch.where(c_lo <= c_hi, lo, hi).to(torch.int32)
    return codes


def quantize_symmetric(weight: torch.Tensor, bits: int, per_channel: bool = True,
                       clip: str = "max", step: float | None = None,
                       rdo: float = 0.0) -> UniformTensor:
    rows = _channel_view(weight, per_channel)
    if step is not None:
        # A fixed step: the bit width follows from the largest code actually needed.
        peak_code = int(torch.round(rows.abs().max() / step).item())
        bits = max(2, min(16, peak_code.bit_length() + 1))
        scales = torch.full((rows.shape[0],), float(step))
    qmax = (1 << (bits - 1)) - 1
    if step is None:
        scales = max_scales(rows, qmax) if clip == "max" else _mse_scales(rows, qmax)
    codes = round_to_grid(rows, scales, qmax)
    if rdo > 0:
        codes = rdo_round(rows / scales[:, None], codes, qmax, rdo)
    axis = 0 if per_channel and weight.dim() > 1 else None
    return UniformTensor(codes.reshape(weight.shape), scales.to(torch.float32), None, bits,
                         axis, weight.dtype)


class UniformMethod(PerTensorMethod):
    name = "uniform"
    chain_rank = 2
    summary = "symmetric uniform grid per output channel (or layer), entropy-coded"
    options = {
        "bits": Option(5, "bit width of the grid (2-8)", int, check=_bits_ok),
        "step": Option(None, "fixed step size instead of bits (bit width follows)", float,
                       check=_step_ok),
        "granularity": Option("channel", "one scale per output channel or per layer", str,
                              choices=("channel", "layer")),
        "clip": Option("max", "scale rule: max magnitude, or MSE-optimal clipping", str,
                       choices=("max", "mse")),
        "rdo": Option(0.1, "rate-distortion rounding weight (0 = round to nearest)", float,
                      check=_rdo_ok),
    }

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> UniformTensor:
        return quantize_symmetric(weight, opts["bits"], opts["granularity"] == "channel",
                                  opts["clip"], opts["step"], opts["rdo"])


class Int8Method(UniformMethod):
    name = "int8"
    chain_rank = 3  # after a representation: snaps it to the int8 grid
    summary = "symmetric int8 per output channel, zero point 0 (TensorRT's grid)"
    options = {
        "granularity": UniformMethod.options["granularity"],
        "clip": Option("max", "scale rule: max magnitude, or MSE-optimal clipping", str,
                       choices=("max", "mse")),
    }

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> UniformTensor:
        return quantize_symmetric(weight, 8, opts["granularity"] == "channel", opts["clip"])
