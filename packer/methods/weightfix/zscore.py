"""One PWFN clustering round: fix weights to the centre that the most weights tolerate
within h standard deviations (METHODS.md 2.5).

The reference scores every candidate against every weight with a (candidates x weights)
z-score matrix. A weight tolerates centre c when c lies in [mu - h sigma, mu + h sigma], so
the number of weights tolerating c is #(lower ends <= c) - #(upper ends < c): two binary
searches over the sorted interval ends. Same counts, O((n + C) log n) time, O(n) memory.
As in WFN, fixed weights stay fixed across rounds (the reference re-clustered them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from packer.methods.weightfix.bayes import SIGMA_FLOOR
from packer.methods.weightfix.centres import pwfn_candidates

MAX_TERMS = 4  # sums of up to four powers of two, as the reference
DISTANCE_FLOOR = 2.0 ** -20  # sigma floor of the z-score
SIGMA_JOINS = ("std_mu", "allow_retraining", "keep_the_same_divide_by_2",
               "keep_the_same_divide_by_10")


@dataclass
class RoundResult:
    values: Tensor  # float32 means, fixed ones at their centre
    sigma: Tensor  # float32, joined for the newly fixed
    fixed: Tensor  # bool
    newly_fixed: int
    centres_chosen: int
    final_terms: int
    final_h: float
    groups: list[dict[str, float]] = field(default_factory=list)


class Tolerances:
    """The free weights' tolerance intervals [mu - h sigma, mu + h sigma], both ends kept
    sorted; fixing weights filters them out in O(n) (filtering keeps the order)."""

    def __init__(self, ids: Tensor, mu: Tensor, scale: Tensor, h: float,
                 small: Tensor | None) -> None:
        lo, hi = mu - h * scale, mu + h * scale
        self.lo, lo_order = torch.sort(lo)
        self.hi, hi_order = torch.sort(hi)
        self.lo_ids, self.hi_ids = ids[lo_order], ids[hi_order]
        # zero_fix: weights below 2^-b tolerate 0 whatever their sigma.
        self.extra_zero = (small & ((lo > 0) | (hi < 0))) if small is not None else None
        self.extra_ids = ids

    def counts(self, candidates: Tensor) -> Tensor:
        """For each candidate, how many weights have it within their interval."""
        counts = (torch.searchsorted(self.lo, candidates, right=True)
                  - torch.searchsorted(self.hi, candidates, right=False))
        if self.extra_zero is not None:
            counts = torch.where(candidates == 0, counts + int(self.extra_zero.sum()), counts)
        return counts

    def remove(self, taken: Tensor) -> None:
        """Drop the weights whose position is set in the bool mask `taken` (all weights)."""
        keep_lo, keep_hi = ~taken[self.lo_ids], ~taken[self.hi_ids]
        self.lo, self.lo_ids = self.lo[keep_lo], self.lo_ids[keep_lo]
        self.hi, self.hi_ids = self.hi[keep_hi], self.hi_ids[keep_hi]
        if self.extra_zero is not None:
            keep = ~taken[self.extra_ids]
            self.extra_zero, self.extra_ids = self.extra_zero[keep], self.extra_ids[keep]


def join_sigma(how: str, group_mu: Tensor, group_sigma: Tensor) -> Tensor:
    if how == "std_mu":
        std = group_mu.std(unbiased=False) if group_mu.numel() > 1 else group_mu.new_zeros(())
        return torch.full_like(group_sigma, max(float(std), SIGMA_FLOOR))
    if how == "keep_the_same_divide_by_2":
        return group_sigma / 2
    if how == "keep_the_same_divide_by_10":
        return group_sigma / 10
    return group_sigma  # allow_retraining


def cluster_round(mu: Tensor, sigma: Tensor, fixed: Tensor, fraction: float, b: int,
                  h: float, inc: float, zero_fix: bool, sigma_join: str) -> RoundResult:
    """Fix free weights until ceil(fraction * n) are fixed in total."""
    mu, sigma, fixed = mu.clone().double(), sigma.clone().float(), fixed.clone()
    n = mu.numel()
    target = n if fraction >= 1.0 else min(n, int(-(-fraction * n // 1)))
    remaining = target - int(fixed.sum())
    terms, counter, newly, chosen = 1, 1, 0, 0
    groups: list[dict[str, float]] = []
    small_limit = 2.0 ** -b
    while remaining > 0:
        free = (~fixed).nonzero().squeeze(1)
        candidates = pwfn_candidates(float(mu[free].abs().max()), terms, b)
        scale = sigma.double().clamp_min(DISTANCE_FLOOR)
        small_all = (mu.abs() < small_limit) if zero_fix else None
        tol = Tolerances(free, mu[free], scale[free], h,
                         small_all[free] if small_all is not None else None)
        while remaining > 0 and candidates.numel():
            counts = tol.counts(candidates)
            best = int(torch.argmax(counts))
            if int(counts[best]) == 0:
                break
            centre = float(candidates[best])
            free = (~fixed).nonzero().squeeze(1)
            z = (mu[free] - centre).abs() / scale[free]
            if small_all is not None and centre == 0.0:
                z = torch.where(small_all[free], torch.zeros_like(z), z)
            members = (z <= h).nonzero().squeeze(1)
            if members.numel() > remaining:
                members = members[torch.argsort(z[members], stable=True)[:remaining]]
            idx = free[members]
            groups.append({"centre": centre, "count": int(idx.numel()),
                           "mu_std": float(mu[idx].std(unbiased=False))})
            sigma[idx] = join_sigma(sigma_join, mu[idx], sigma[idx])
            mu[idx] = centre
            fixed[idx] = True
            taken = torch.zeros(n, dtype=torch.bool)
            taken[idx] = True
            tol.remove(taken)
            remaining -= int(idx.numel())
            newly += int(idx.numel())
            chosen += 1
            candidates = torch.cat([candidates[:best], candidates[best + 1:]])
        if remaining > 0:
            if terms < MAX_TERMS and counter % 2 == 1:
                terms += 1
            else:
                h *= inc
            counter += 1
    return RoundResult(mu.float(), sigma, fixed, newly, chosen, terms, h, groups)
