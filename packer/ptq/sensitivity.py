"""Per-layer sensitivity: the expected increase of the output KL divergence (nats per image,
against the uncompressed model) when one layer alone is compressed at one candidate rate.

Two measures of the same quantity (ZeroQ's additive per-layer KL, Cai et al. 2020):
- `fisher` (default): its second-order expansion, the Fisher quadratic form
  1/2 E[<dW, grad log p_y>^2] with y drawn from the model's own output (packer.ptq.stats):
  one forward/backward pass over the calibration images for all candidates at once.
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

from packer.ptq.flags import MEASURES
from packer.ptq.stats import fisher_quadratics, supported
from runtime.tensors import CompressedTensor

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
                        batches: Sequence[Tensor], measure: str,
                        progress: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Distortion of every (layer, rate) in `layers` (tensor name -> rates), and timings.

    `on_candidate` sees each candidate once (to count its bytes) before it is dropped.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown sensitivity measure {measure!r}")
    timings: dict[str, float] = {}
    model.eval()
    modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in layers}
    fisher = {n for n, m in modules.items() if measure == "fisher" and supported(m)}
    reference = _logprobs(model, batches) if set(layers) - fisher else None
    out: dict[str, list[float]] = {n: [] for n in layers}
    deltas: dict[str, list[Tensor]] = {}
    started = time.perf_counter()
    work = [(n, r) for n, rates in layers.items() for r in rates]
    bar = tqdm(work, desc=f"candidates ({measure})", unit="candidate", disable=not progress,
               leave=False)
    for name, rate in bar:
        tensor = candidate(name, rate)
        on_candidate(name, rate, tensor)
        weight = modules[name].weight
        if name in fisher:
            deltas.setdefault(name, []).append(tensor.dequantize() - weight.detach())
            continue
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(tensor.dequantize())
        try:
            out[name].append(max(0.0, _kl(model, batches, reference)))
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    timings["candidates_seconds"] = round(time.perf_counter() - started, 2)
    if deltas:
        started = time.perf_counter()
        by_layer = {n.rsplit(".", 1)[0]: d for n, d in deltas.items()}
        extra: dict[str, float] = {}
        quads = fisher_quadratics(model, by_layer, batches, extra)
        timings["fisher_mass_left_out"] = float(f"{extra['mass_left_out']:.3g}")
        for name in deltas:
            out[name] = quads[name.rsplit(".", 1)[0]]
        timings["fisher_seconds"] = round(time.perf_counter() - started, 2)
    return out, timings
