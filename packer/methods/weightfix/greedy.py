"""One WFN fixing step: greedily fix weights to power-of-two centres (METHODS.md 1.5).

Repeatedly pick the candidate centre that is nearest for the most unfixed weights, and fix
the longest run of its closest weights whose mean distance stays within the allowed
distance. When a centre takes nothing, allow sums of more powers of two (order + 1); past
order 20, double the allowed distance. Differences from the reference, on purpose:
already-fixed weights stay fixed (it re-clustered everything from scratch and could unfix
them), and its odd "last unsorted distance" acceptance check is not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from packer.methods.weightfix.centres import nearest, wfn_candidates

MAX_ORDER = 20
MAX_ROUNDS = 100_000  # a guard; real steps need tens to a few hundred rounds


@dataclass
class FixResult:
    values: Tensor  # float32, all entries (new fixed ones at their centre)
    fixed: Tensor  # bool
    newly_fixed: int
    rounds: int
    max_order: int
    per_order: dict[int, int] = field(default_factory=dict)  # newly fixed weights by order
    distance_mean: float = 0.0  # mean acceptance distance of the newly fixed weights


def acceptance_distance(w: Tensor, centre: float, relative: bool,
                        zero_distance: float) -> Tensor:
    """Distance of each weight to `centre`: relative |w-c|/|w| (0/0 -> 1) or absolute;
    weights below zero_distance are at distance 0 from the 0 centre (free pruning)."""
    dist = (w - centre).abs()
    if relative:
        mag = w.abs()
        dist = torch.where(mag > 0, dist / mag.clamp_min(1e-30), torch.ones_like(dist))
    if centre == 0.0:
        dist = torch.where(w.abs() < zero_distance, torch.zeros_like(dist), dist)
    return dist


def accepted_prefix(sorted_dist: Tensor, allowed: float) -> int:
    """Length of the longest prefix whose running mean distance is <= allowed; leading
    exact zeros do not dilute the mean (the reference's divisor rule)."""
    n = sorted_dist.numel()
    if n == 0:
        return 0
    zeros = int((sorted_dist == 0).sum())  # sorted ascending: zeros lead
    count = torch.arange(1, n + 1, dtype=torch.float64) - (zeros if zeros > 1 else 0)
    running = torch.cumsum(sorted_dist.double(), 0) / count.clamp_min(1)
    return int((running <= allowed).sum())


def fix_step(values: Tensor, fixed: Tensor, fraction: float, distance: float,
             relative: bool, zero_distance: float) -> FixResult:
    """Fix unfixed entries of `values` until floor(fraction * n) are fixed in total."""
    values, fixed = values.clone().double(), fixed.clone()
    target = int(fraction * values.numel() + 1e-9)
    if fraction >= 1.0:
        target = values.numel()
    allowed, order, rounds, top_order = distance, 0, 0, 0
    per_order: dict[int, int] = {}
    newly, dist_sum = 0, 0.0
    while int(fixed.sum()) < target:
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise RuntimeError("weight fixing did not converge; report this with the model")
        free = (~fixed).nonzero().squeeze(1)
        w = values[free]
        centres = wfn_candidates(float(w.abs().max()), distance, order, zero_distance)
        votes = torch.bincount(nearest(w, centres), minlength=centres.numel())
        centre = float(centres[int(torch.argmax(votes))])
        dist = acceptance_distance(w, centre, relative, zero_distance)
        sorted_dist, order_idx = torch.sort(dist, stable=True)
        n_ok = accepted_prefix(sorted_dist, allowed)
        take = min(n_ok, target - int(fixed.sum()))
        if take == 0:
            order += 1
            top_order = max(top_order, order)
            if order > MAX_ORDER:
                allowed *= 2
            continue
        chosen = free[order_idx[:take]]
        values[chosen] = centre
        fixed[chosen] = True
        per_order[order] = per_order.get(order, 0) + take
        newly += take
        dist_sum += float(sorted_dist[:take].double().sum())
        allowed = distance
    return FixResult(values.float(), fixed, newly, rounds, top_order, per_order,
                     dist_sum / newly if newly else 0.0)
