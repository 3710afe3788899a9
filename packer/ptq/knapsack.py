"""Multiple-choice knapsack: one candidate per layer, least total distortion within a byte
budget. Exact dynamic programming over bytes counted in units of `unit` (each candidate's
bytes rounded up, so a solution that fits in units fits in bytes); with `unit=1` the answer
is the true optimum. A greedy Lagrangian search would only reach points on the convex hull
of each layer's rate-distortion curve and can leave several per cent of the budget unused;
the DP uses it to the unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESOLUTION = 20_000  # budget units: DP cost is layers x candidates x RESOLUTION


@dataclass(frozen=True)
class Option:
    """One candidate of one layer."""

    bytes: int
    distortion: float


def unit_for(capacity: int, resolution: int = RESOLUTION) -> int:
    return max(1, math.ceil(capacity / resolution))


def solve(layers: Sequence[Sequence[Option]], capacity: int, floor: int = 0,
          resolution: int = RESOLUTION) -> list[int] | None:
    """Index of the chosen option per layer: least total distortion with total bytes at most
    `capacity` and (in units) at least `floor`; None when no choice fits. Ties in distortion
    go to the solution that uses more bytes."""
    if capacity < 0 or not layers:
        return None if capacity < 0 else []
    unit = unit_for(capacity, resolution)
    cap = capacity // unit
    costs = [[math.ceil(o.bytes / unit) for o in layer] for layer in layers]
    if sum(min(c) for c in costs) > cap:
        return None
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(layers), cap + 1), dtype=np.int16)
    for li, layer in enumerate(layers):
        new = np.full(cap + 1, np.inf)
        for oi, (cost, option) in enumerate(zip(costs[li], layer, strict=True)):
            if cost > cap:
                continue
            shifted = np.full(cap + 1, np.inf)
            shifted[cost:] = best[:cap + 1 - cost] + option.distortion
            better = shifted < new
            new[better] = shifted[better]
            picks[li, better] = oi
        best = new
    best[: min(cap + 1, floor // unit)] = np.inf
    finite = np.isfinite(best)
    if not finite.any():
        return None
    low = best[finite].min()
    tol = 1e-12 * max(1.0, abs(low))
    used = int(np.flatnonzero(best <= low + tol)[-1])
    choice = [0] * len(layers)
    for li in range(len(layers) - 1, -1, -1):
        oi = int(picks[li, used])
        choice[li] = oi
        used -= costs[li][oi]
    return choice


def total(layers: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[int, float]:
    """(bytes, distortion) of a choice."""
    return (sum(layers[i][c].bytes for i, c in enumerate(choice)),
            sum(layers[i][c].distortion for i, c in enumerate(choice)))
