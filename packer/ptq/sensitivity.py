"""Per-layer sensitivity: the expected increase of the output KL divergence (nats per image,
against the uncompressed model) when one layer alone is compressed at one candidate rate.

Two measures of the same quantity (ZeroQ's additive per-layer KL, Cai et al. 2020):
- `fisher` (default): the second-order estimate 1/2 sum_c S_c dW_c A dW_c^T with the layer's
  Kronecker-factored Fisher (packer.ptq.stats): one forward/backward pass over the
  calibration images, then every candidate costs a few small matrix products.
- `kl`: measured, one forward pass over the calibration images per layer and rate (exact for
  that layer alone, and many times slower). Also used for layer types `fisher` does not cover.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from packer.ptq.stats import fisher_stats, supported
from runtime.tensors import CompressedTensor

MEASURES = ("fisher", "kl")

# (tensor name, rate) -> the candidate; the caller encodes and drops it as it goes.
CandidateFn = Callable[[str, int], CompressedTensor]


@torch.no_grad()
def _logprobs(model: nn.Module, batches: Sequence[Tensor]) -> list[Tensor]:
    return [F.log_softmax(model(b).double(), 1) for b in batches]


@torch.no_grad()
def _kl(model: nn.Module, batches: Sequence[Tensor], reference: list[Tensor]) -> float:
    total, count = 0.0, 0
    for batch, ref in zip(batches, reference, strict=True):
        logp = F.log_softmax(model(batch).double(), 1)
        total += float((ref.exp() * (ref - logp)).sum())
        count += batch.shape[0]
    return total / max(1, count)


def layer_sensitivities(model: nn.Module, layers: dict[str, list[int]], candidate: CandidateFn,
                        on_candidate: Callable[[str, int, CompressedTensor], None],
                        batches: Sequence[Tensor], measure: str, seed: int,
                        progress: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Distortion of every (layer, rate) in `layers` (tensor name -> rates), and timings.

    `on_candidate` sees each candidate once (to count its bytes) before it is dropped.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown sensitivity measure {measure!r}")
    timings: dict[str, float] = {}
    model.eval()
    modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in layers}
    fisher_layers = {n.rsplit(".", 1)[0]: m for n, m in modules.items()
                     if measure == "fisher" and supported(m)}
    stats = {}
    if fisher_layers:
        started = time.perf_counter()
        stats = fisher_stats(model, fisher_layers, batches, seed)
        timings["fisher_seconds"] = round(time.perf_counter() - started, 2)
    reference = None
    if any(n.rsplit(".", 1)[0] not in stats for n in layers):
        reference = _logprobs(model, batches)
    out: dict[str, list[float]] = {}
    started = time.perf_counter()
    work = [(n, r) for n, rates in layers.items() for r in rates]
    bar = tqdm(work, desc=f"sensitivity ({measure})", unit="candidate", disable=not progress,
               leave=False)
    for name, rate in bar:
        tensor = candidate(name, rate)
        on_candidate(name, rate, tensor)
        weight = modules[name].weight
        layer = name.rsplit(".", 1)[0]
        if layer in stats:
            value = stats[layer].kl_increase(tensor.dequantize() - weight.detach())
        else:
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(tensor.dequantize())
            try:
                value = _kl(model, batches, reference)
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
        out.setdefault(name, []).append(max(0.0, value))
    timings["candidates_seconds"] = round(time.perf_counter() - started, 2)
    return out, timings
