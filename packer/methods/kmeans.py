"""`kmeans`: per-layer scalar weight sharing (Deep Compression, Han et al. 2016).

K centroids initialised linearly between the layer's min and max (the paper's best init),
refined by Lloyd iterations. Exact zeros in the input (pruned weights) keep a dedicated
centroid of exactly 0 so sparsity survives; the other K-1 centroids cluster the rest.
"""

from __future__ import annotations

from typing import Any

import torch

from packer.config import Option
from packer.methods.base import PerTensorMethod
from runtime.tensors import ScalarCodebookTensor


def _k_ok(k: int) -> str | None:
    return None if 2 <= k <= 65536 else "k must be between 2 and 65536"


def _iters_ok(n: int) -> str | None:
    return None if 0 <= n <= 10_000 else "kmeans_iters must be between 0 and 10000"


def assign_nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (1-D: binary search on midpoints).

    `centroids` must be sorted. O(n log K) time and O(n) memory, unlike the n x K distance
    matrix of a generic k-means; ties go to the lower centroid, deterministically.
    """
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids, values, right=False)


def lloyd_1d(values: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-init Lloyd k-means on a 1-D float32 tensor -> (sorted centroids, indices)."""
    lo, hi = values.min(), values.max()
    centroids = torch.linspace(float(lo), float(hi), k, dtype=torch.float32)
    idx = assign_nearest(values, centroids)
    for _ in range(iters):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values.double())
        counts = torch.bincount(idx, minlength=k)
        # An empty cluster keeps its previous centroid rather than collapsing.
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.double())
        updated = torch.sort(updated.float()).values
        new_idx = assign_nearest(values, updated)
        converged = torch.equal(new_idx, idx) and torch.equal(updated, centroids)
        centroids, idx = updated, new_idx
        if converged:
            break
    return centroids, idx


def kmeans_share(weight: torch.Tensor, k: int, iters: int) -> ScalarCodebookTensor:
    flat = weight.detach().reshape(-1).to(torch.float32)
    zero = flat == 0
    has_zeros = bool(zero.any())
    nonzero = flat[~zero]
    n_unique = int(torch.unique(nonzero).numel()) if nonzero.numel() else 0
    k_nonzero = max(1, min(k - int(has_zeros), n_unique))
    if nonzero.numel():
        centroids, idx_nz = lloyd_1d(nonzero, k_nonzero, iters)
    else:
        centroids, idx_nz = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if has_zeros:
        # Slot 0 is the exact zero; shift the others up by one.
        codebook = torch.cat([torch.zeros(1), centroids])
        indices = torch.zeros(flat.numel(), dtype=torch.long)
        indices[~zero] = idx_nz + 1
    else:
        codebook, indices = centroids, idx_nz
    return ScalarCodebookTensor(codebook.contiguous(), indices.reshape(weight.shape),
                                weight.dtype)


class KMeansMethod(PerTensorMethod):
    name = "kmeans"
    chain_rank = 2
    summary = "per-layer k-means weight sharing (K centroids, linear init, Lloyd)"
    options = {
        "k": Option(32, "clusters per layer (32 = 5-bit indices)", int, check=_k_ok),
        "kmeans_iters": Option(30, "Lloyd iterations (stops early at convergence)", int,
                               check=_iters_ok),
    }
    rate_option = "k"
    rates = (4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> ScalarCodebookTensor:
        return kmeans_share(weight, opts["k"], opts["kmeans_iters"])
