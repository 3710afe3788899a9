"""`kmeans`: per-layer scalar weight sharing (Deep Compression, Han et al. 2016).

K centroids initialised linearly between the layer's min and max (the paper's best init),
refined by Lloyd iterations. Exact zeros in the input (pruned weights) keep a dedicated
centroid of exactly 0 so sparsity survives; the other K-1 centroids cluster the rest.

With `finetune_epochs` > 0 (and training data) the centroids are then trained by gradient
sharing (Deep Compression section 3): each layer's weight is its codebook indexed by frozen
assignments, so the gradient of a centroid is the sum of its members' gradients; the zero
centroid is held at exactly 0. Biases, BatchNorm and uncompressed layers train along.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from packer.config import Option
from packer.methods.base import CompressJob, PerTensorMethod
from packer.methods.pqf.layers import attach_pq, detach_pq
from packer.methods.stage_finetune import (
    finetune_epochs,
    finetune_options,
    run_finetune,
    teacher_of,
)
from runtime.tensors import CompressedTensor, ScalarCodebookTensor

DEFAULT_EPOCHS_WITH_DATA = 1


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
    trains = True  # with data, centroids are fine-tuned by gradient sharing
    summary = "per-layer k-means weight sharing, centroids trained by gradient sharing"
    options = {
        "k": Option(32, "clusters per layer (32 = 5-bit indices)", int, check=_k_ok),
        "kmeans_iters": Option(30, "Lloyd iterations (stops early at convergence)", int,
                               check=_iters_ok),
        **finetune_options(DEFAULT_EPOCHS_WITH_DATA, lr=1e-4, optimizer="adam",
                           weight_decay=0.0),
    }
    rate_option = "k"
    rates = (4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        return {"kmeans_finetune": dict(self.report)} if self.report else {}

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> ScalarCodebookTensor:
        return kmeans_share(weight, opts["k"], opts["kmeans_iters"])

    def post_training(self, job: CompressJob) -> bool:
        return finetune_epochs(job, self.name, DEFAULT_EPOCHS_WITH_DATA) == 0

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        epochs = finetune_epochs(job, self.name, DEFAULT_EPOCHS_WITH_DATA)
        teacher = teacher_of(job, epochs)
        shared = super().compress(job)
        if epochs == 0:
            return shared
        model = job.model.cpu()
        fixed_zero = {n: bool((job.state_dict[n] == 0).any()) for n in shared}
        for name, tensor in shared.items():
            attach_shared(model.get_submodule(name.rsplit(".", 1)[0]), tensor, fixed_zero[name])
        for p in model.parameters():
            p.requires_grad_(True)
        self.report = run_finetune(job, self.name, epochs, teacher, after_step=zero_centroids)
        for p in model.parameters():
            p.requires_grad_(False)
        out = {n: detach_shared(model.cpu().get_submodule(n.rsplit(".", 1)[0]))
               for n in shared}
        job.model.cpu().eval()
        job.take_model_state()
        return out


# --- gradient sharing ---------------------------------------------------------------------


def _hold_zero(grad: Tensor) -> Tensor:
    grad = grad.clone()
    grad[0] = 0
    return grad


def attach_shared(module: nn.Module, tensor: ScalarCodebookTensor, fixed_zero: bool) -> None:
    """The module's weight becomes codebook[indices], the codebook a trainable Parameter (a
    product quantizer with sub-vectors of one value); with `fixed_zero`, entry 0 (the pruned
    weights' cluster) gets no gradient."""
    attach_pq(module, tensor.codebook.float().reshape(-1, 1), tensor.indices.reshape(-1))
    module.weight_fixed_zero = fixed_zero
    if fixed_zero:
        module.weight_codebook.register_hook(_hold_zero)


def zero_centroids(model: nn.Module) -> None:
    """After every optimizer step: the pruned cluster's centroid back to exactly 0."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "weight_fixed_zero", False):
                module.weight_codebook[0] = 0


def detach_shared(module: nn.Module) -> ScalarCodebookTensor:
    shape = tuple(module.weight_shape)
    del module.weight_fixed_zero
    vector = detach_pq(module, fp16=False)
    return ScalarCodebookTensor(vector.codebook.reshape(-1).contiguous(),
                                vector.indices.reshape(shape), torch.float32)
