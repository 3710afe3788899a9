"""Which weights to keep: scores per criterion, and masks from scores by density.

All selection is by rank, with ties broken by position (layers in module order, then each
weight's row-major index), so a mask keeps exactly the number of weights asked for and is the
same on every machine.

* magnitude: score |w|.
* snip (Lee et al. 2019; the reference's baseline.py): score |dL/dc| = |g * w| for a
  multiplicative mask c = 1 on each weight, g the loss gradient on a few batches.
* ecs (the reference's ECS.py): keep a weight when |g| or |w| is among the largest, globally.
  The reference puts both thresholds at the (1 - density) percentile, which keeps between
  density and 2 x density ("reference"); "exact" lowers both ranks together until exactly
  density is kept: a weight's priority is the better of its two ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

Scores = Mapping[str, Tensor]


def keep_count(density: float, numel: int) -> int:
    """round(density * numel) (halves up), and at least one weight."""
    return max(1, min(numel, int(np.floor(density * numel + 0.5))))


def _flat(scores: Scores) -> tuple[Tensor, list[tuple[str, int, int]]]:
    """All scores as one float64 vector, and where each layer sits in it."""
    spans, parts, at = [], [], 0
    for name, s in scores.items():
        parts.append(s.detach().reshape(-1).to(torch.float64))
        spans.append((name, at, at + s.numel()))
        at += s.numel()
    return torch.cat(parts), spans


def _unflat(keep: Tensor, spans: list[tuple[str, int, int]],
            scores: Scores) -> dict[str, Tensor]:
    return {name: keep[a:b].reshape(scores[name].shape) for name, a, b in spans}


def top_mask(values: Tensor, count: int) -> Tensor:
    """Boolean mask of the `count` largest values; ties to the lower index."""
    order = torch.sort(-values, stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def ranks(values: Tensor) -> Tensor:
    """Rank of each value from the largest (0), ties to the lower index."""
    order = torch.sort(-values, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def keep_top(scores: Scores, density: float) -> dict[str, Tensor]:
    """One pool: the round(density * N) highest scores over all the given layers."""
    flat, spans = _flat(scores)
    return _unflat(top_mask(flat, keep_count(density, flat.numel())), spans, scores)


def ecs_keep(weights: Scores, grads: Scores, density: float,
             rule: str = "exact") -> dict[str, Tensor]:
    """ECS over one pool of layers: keep |g| or |w| among the largest.

    `exact`: the round(density * N) weights whose better rank (by |w| or by |g|) is smallest.
    `reference`: |g| >= the (1 - density) percentile of |g| or |w| >= that of |w| (numpy's
    linear-interpolation percentile, as the reference's np.percentile), density..2 x density.
    """
    w, spans = _flat({n: t.abs() for n, t in weights.items()})
    g, _ = _flat({n: t.abs() for n, t in grads.items()})
    if rule == "reference":
        q = 100.0 * (1.0 - density)
        keep = (g >= float(np.percentile(g.numpy(), q))) | (w >= float(np.percentile(w.numpy(), q)))
    else:
        priority = torch.minimum(ranks(w), ranks(g)).to(torch.float64)
        keep = top_mask(-priority, keep_count(density, w.numel()))
    return _unflat(keep, spans, weights)
