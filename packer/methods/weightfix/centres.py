"""Candidate cluster centres built from powers of two (WFN section 1.4, PWFN section 2.5).

Both methods fix weights to 0 or to short sums of signed powers of two, so that a layer's
values are few, exact in float32, and often exact on an int8 grid. Everything here is
float64 on the CPU: the candidate sets are tiny, and exactness matters more than speed.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def round_pow2(x: Tensor, zero_distance: float, min_exponent: float,
               zero_small: bool) -> Tensor:
    """sign(x) * 2^max(e_min, round(log2|x|)), rounding in the log domain (WFN's P(x)).

    With `zero_small`, values with |x| < zero_distance become 0 (the first term only)."""
    mag = x.abs()
    exps = torch.round(torch.log2(mag.clamp_min(1e-300))).clamp_min(min_exponent)
    out = torch.sign(x) * torch.pow(2.0, exps)
    out = torch.where(mag == 0, torch.zeros_like(out), out)
    if zero_small:
        out = torch.where(mag < zero_distance, torch.zeros_like(out), out)
    return out


def wfn_candidates(max_abs: float, distance: float, order: int,
                   zero_distance: float) -> Tensor:
    """C_p: 0 and +-c(g) for the geometric grid g_0 = z, g_{k+1} = g_k (1+d)/(1-d) < max_abs.

    c(g) is g rounded to a power of two, then refined `order` times by adding the rounded
    residual while that residual is at least d*|g|: sums of up to order+1 powers of two.
    Sorted ascending, deduplicated, float64.
    """
    d = min(distance, 0.9999)
    ratio = (1 + d) / (1 - d)
    count = 1
    if max_abs > zero_distance:
        count = int(math.floor(math.log(max_abs / zero_distance) / math.log(ratio))) + 1
        count = max(1, min(count, 1_000_000))
    grid = zero_distance * torch.pow(torch.tensor(ratio, dtype=torch.float64),
                                     torch.arange(count, dtype=torch.float64))
    grid = grid[grid < max_abs] if max_abs > zero_distance else grid[:1]
    e_min = math.log2(zero_distance) - order - 1
    c = round_pow2(grid, zero_distance, e_min, zero_small=True)
    for _ in range(order):
        r = grid - c
        refine = (r.abs() >= d * grid.abs()) & (c != 0)
        c = torch.where(refine, c + round_pow2(r, zero_distance, e_min, zero_small=False), c)
    return torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), c, -c]))


def pwfn_candidates(max_abs: float, terms: int, b: int) -> Tensor:
    """0 and +-(sums of `terms` powers 2^k, k = -b .. ceil(log2 max_abs) - 1, with
    repetition), kept where |c| <= max_abs (PWFN's candidates of order `terms`)."""
    top = math.ceil(math.log2(max_abs)) if max_abs > 0 else -b
    powers = [2.0 ** k for k in range(-b, max(top, -b + 1))] + [0.0]
    sums = {sum(combo) for combo in itertools.combinations_with_replacement(powers, terms)}
    kept = torch.tensor(sorted(s for s in sums if s <= max_abs), dtype=torch.float64)
    return torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), kept, -kept]))


def nearest(values: Tensor, centres: Tensor) -> Tensor:
    """Index of the nearest centre (by absolute distance) for each value; `centres` sorted."""
    mids = (centres[1:] + centres[:-1]) / 2
    return torch.searchsorted(mids.to(values.dtype), values.contiguous())
