"""k-means on torch tensors for product quantization (plain Lloyd and the reference's `src`).

Why not the reference's code as is: its codes come from the assignment *before* the final
centroid update (codes and codebook disagree), empty clusters collapse to the zero vector, and
its initial draw is unseeded. Here the last step is always an assignment against the returned
centroids, empty clusters are re-seeded from a member of the largest cluster (and counted), and
every random draw comes from one seeded generator, so the same input and seed give the same
result. Assignment runs in chunks so the n x K distance matrix never exceeds `chunk_elems`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KMEANS_TYPES = ("kmeans", "src")
INITS = ("random", "kmeans++")


@dataclass(frozen=True)
class KMeansResult:
    centroids: Tensor  # [K, d] float32
    codes: Tensor  # [n] int64, nearest centroid of each row
    mse: float  # sum of squared errors / n (the reference's logged per-layer figure)
    empty_reseeded: int  # clusters that went empty and were re-seeded
    iterations: int


def assign(x: Tensor, centroids: Tensor, chunk_elems: int = 1 << 20,
           x_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid (squared L2) per row -> (codes, squared distances), in bounded memory.

    Chunks of 2^20 distances (4 MiB) bound memory on any layer size.
    """
    n, k = x.shape[0], centroids.shape[0]
    if x_sq is None:
        x_sq = (x * x).sum(1)
    rows = max(1, chunk_elems // max(k, 1))
    c_sq = (centroids * centroids).sum(1)
    codes = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        chunk = x[start:start + rows]
        d2 = torch.addmm(c_sq.unsqueeze(0), chunk, centroids.t(), alpha=-2.0)
        best, idx = d2.min(1)
        codes[start:start + rows] = idx
        dists[start:start + rows] = (best + x_sq[start:start + rows]).clamp_min(0)
    return codes, dists


def _init(x: Tensor, k: int, how: str, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    if how == "random":
        # The reference's init: K distinct rows plus a little noise, so duplicates still differ.
        pick = torch.randperm(n, generator=gen, device="cpu")[:k].to(x.device)
        noise = torch.randn(k, x.shape[1], generator=gen).to(x) * 1e-5
        return x[pick] + noise
    # k-means++ on a seeded sample of at most 32 K rows: the seeding quality of the full
    # set at a fraction of its K sequential passes (which dominated the run time).
    if n > 32 * k:
        x = x[torch.randperm(n, generator=gen)[:32 * k].to(x.device)]
        n = x.shape[0]
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[first]
    d2 = (x_sq - 2 * (x @ x[first]) + x_sq[first]).clamp_min(0)
    for j in range(1, k):
        cdf = torch.cumsum(d2.double(), 0)
        total = float(cdf[-1])
        if total <= 0:  # fewer distinct rows than clusters: any row will do
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
            idx = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype,
                                                                 device=cdf.device))), n - 1)
        centroids[j] = x[idx]
        d2 = torch.minimum(d2, (x_sq - 2 * (x @ x[idx]) + x_sq[idx]).clamp_min(0))
    return centroids


def _reseed_empty(centroids: Tensor, codes: Tensor, counts: Tensor, x: Tensor,
                  gen: torch.Generator) -> int:
    """Give every empty cluster a random member of the currently largest cluster."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    for e in empty:
        largest = int(torch.argmax(counts))
        members = torch.nonzero(codes == largest).flatten()
        pick = members[int(torch.randint(members.numel(), (1,), generator=gen))]
        centroids[e] = x[pick]
        codes[pick] = e  # the member moves, so a second empty cluster picks elsewhere
        counts[largest] -= 1
        counts[e] = 1
    return len(empty)


def kmeans(x: Tensor, k: int, iters: int, *, kind: str = "src", init: str = "kmeans++",
           seed: int = 0, chunk_elems: int = 1 << 20) -> KMeansResult:
    """Cluster the rows of `x` [n, d] into `k` centroids.

    `kind="src"` is the reference's stochastic relaxation: `iters + 1` updates where each
    centroid is the mean of its members perturbed by annealed noise
    sqrt(1 - i/iters) * N(0, 1) * std_per_dim(x), so early iterations escape poor minima.
    """
    if kind not in KMEANS_TYPES:
        raise ValueError(f"kmeans kind must be one of {KMEANS_TYPES}")
    if init not in INITS:
        raise ValueError(f"kmeans init must be one of {INITS}")
    x = x.detach().float().contiguous()
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters from {n} sub-vectors")
    gen = torch.Generator().manual_seed(seed)
    centroids = _init(x, k, init, gen)
    std = x.std(0, unbiased=True) if n > 1 else torch.zeros(d, device=x.device)
    steps = iters + 1 if kind == "src" else iters
    reseeded = 0
    x_sq = (x * x).sum(1)
    codes, dists = assign(x, centroids, chunk_elems, x_sq)
    done = 0
    for i in range(steps):
        counts = torch.bincount(codes, minlength=k)
        if bool((counts == 0).any()):
            reseeded += _reseed_empty(centroids, codes, counts, x, gen)
        data = x
        if kind == "src" and iters > 0:
            scale = (1.0 - i / iters) ** 0.5
            if scale > 0:
                data = x + scale * torch.randn(n, d, generator=gen).to(x) * std
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        sums.index_add_(0, codes, data.double())
        centroids = (sums / counts.clamp_min(1).unsqueeze(1).double()).float()
        new_codes, dists = assign(x, centroids, chunk_elems, x_sq)
        done = i + 1
        converged = kind == "kmeans" and torch.equal(new_codes, codes)
        codes = new_codes
        if converged:
            break
    counts = torch.bincount(codes, minlength=k)
    if bool((counts == 0).any()):
        # Keep the codebook useful to the fine-tuning that follows: no dead codewords.
        reseeded += _reseed_empty(centroids, codes, counts, x, gen)
        codes, dists = assign(x, centroids, chunk_elems, x_sq)
    return KMeansResult(centroids, codes, float(dists.double().sum()) / n, reseeded, done)
