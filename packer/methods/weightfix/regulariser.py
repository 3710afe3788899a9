"""WFN's clustering regulariser: pull unfixed weights toward the chosen centres (1.6).

R = mean over unfixed weights of sum_c softmin_c(D_jc / T) * D_jc with T = 0.05, and the
loss CE + alpha * R with alpha = stop_gradient(gamma * CE / R), so the term always weighs
gamma * CE and only its direction matters.

The reference builds the full (weights x centres) matrix and lets autograd keep it. Here a
custom autograd function walks the weights in chunks, and backward recomputes each chunk
from dR_j/dD_jc = pi_jc (1 - (D_jc - R_j) / T), so memory stays at one chunk whatever the
model size, with the same value and gradient. (Softmin at T = 0.05 is not peaked enough to
keep only the nearest centres: with dense centre sets or absolute distances far more than
the neighbours carry weight.) The relative distance's denominator |w| is treated as a
constant, so the gradient pulls toward centres rather than toward larger weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

TEMPERATURE = 0.05
CHUNK = 1 << 16  # weights per chunk: chunk x centres floats live at once


def _distances(w: Tensor, centres: Tensor, relative: bool, zero_distance: float
               ) -> tuple[Tensor, Tensor]:
    """(D [n, C], dD/dw [n, C]) for a chunk of weights."""
    diff = w.unsqueeze(1) - centres.unsqueeze(0)
    dist, grad = diff.abs(), torch.sign(diff)
    if relative:
        mag = w.abs().unsqueeze(1)
        scaled = mag > zero_distance
        denom = torch.where(scaled, mag, torch.ones_like(mag))
        dist, grad = dist / denom, grad / denom
    small = (w.abs() <= zero_distance).unsqueeze(1) & (centres == 0).unsqueeze(0)
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    return torch.where(small, zero, dist), torch.where(small, zero, grad)


class _SoftClusterDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, centres: Tensor, relative: bool,
                zero_distance: float) -> Tensor:
        per_weight = torch.empty_like(w)
        for i in range(0, w.numel(), CHUNK):
            dist, _ = _distances(w[i:i + CHUNK], centres, relative, zero_distance)
            pi = torch.softmax(-(dist + 1e-14) / TEMPERATURE, dim=1)
            per_weight[i:i + CHUNK] = (pi * dist).sum(1)
        ctx.save_for_backward(w, centres, per_weight)
        ctx.relative, ctx.zero_distance = relative, zero_distance
        return per_weight.mean()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        w, centres, per_weight = ctx.saved_tensors
        grad = torch.empty_like(w)
        for i in range(0, w.numel(), CHUNK):
            dist, d_dw = _distances(w[i:i + CHUNK], centres, ctx.relative, ctx.zero_distance)
            pi = torch.softmax(-(dist + 1e-14) / TEMPERATURE, dim=1)
            r = per_weight[i:i + CHUNK].unsqueeze(1)
            d_r = pi * (1 - (dist - r) / TEMPERATURE)
            grad[i:i + CHUNK] = (d_r * d_dw).sum(1)
        return grad * (grad_out / w.numel()), None, None, None


def cluster_distance(w: Tensor, centres: Tensor, relative: bool,
                     zero_distance: float) -> Tensor:
    """Soft distance R of the weights `w` (differentiable) to the `centres`."""
    if w.numel() == 0 or centres.numel() == 0:
        return w.sum() * 0.0
    return _SoftClusterDistance.apply(w, centres.to(w.device, w.dtype), relative,
                                      zero_distance)


def regularised_loss(ce: Tensor, r: Tensor, gamma: float) -> Tensor:
    """CE + gamma * CE / R (stopped) * R: the term's value is gamma * CE."""
    if gamma <= 0 or not bool(r.detach() > 0):
        return ce
    alpha = (gamma * ce / r).detach()
    return ce + alpha * r
