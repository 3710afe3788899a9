"""Calibrated start for FBS predictors: each saliency predictor fitted, by least squares on
training images, to how strongly its channels respond, and kept close to 1.

Why: with the reference's start (nn.Linear's default init) every gated conv multiplies its
channels by random saliencies, so the pretrained network falls to about chance before any
training, and a short schedule spends its epochs climbing back. A predictor that ranks
channels by their predicted response but scales them by ~1 keeps the pretrained function at
the first stage (keep ratio 0.9): the suppressed channels are the ones that respond least on
that image, and boosting starts neutral and is learned. `tools/bench/fbs.py select` compares
the two starts on held-out images.

The fit: for gated conv c, pooled input p = mean_hw |x| (what the predictor reads) and
response t = mean_hw |y| at the gate's point (the BatchNorm after the conv, else the conv).
Least squares gives t / mean(t) ~ W p + b; the predictor starts as (scale W, 1 + scale b),
so s = |1 + scale (W p + b)|: order by predicted response, size ~1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from runtime.gating import gate_points


@torch.no_grad()
def fit_predictors(model: nn.Module, convs: list[str], batches: Iterable[Tensor],
                   scale: float) -> dict[str, tuple[Tensor, Tensor]]:
    """Conv name -> (weight [C_out, C_in], bias [C_out]) of its calibrated predictor, from
    the ungated `model` run (in eval mode) on `batches` of images."""
    points = gate_points(model, convs)
    pooled: dict[str, list[Tensor]] = {n: [] for n in convs}
    response: dict[str, list[Tensor]] = {n: [] for n in convs}
    hooks = []
    for name in convs:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, n=name: pooled[n].append(args[0].abs().mean((2, 3)).double())))
        hooks.append(model.get_submodule(points[name]).register_forward_hook(
            lambda _m, _a, out, n=name: response[n].append(out.abs().mean((2, 3)).double())))
    was_training = model.training
    model.eval()
    try:
        for images in batches:
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    fitted = {}
    for name in convs:
        p, t = torch.cat(pooled[name]), torch.cat(response[name])
        target = t / t.mean().clamp_min(1e-12)
        design = torch.cat([p, torch.ones(len(p), 1, dtype=p.dtype)], dim=1)
        # Tiny ridge: a channel that never responds (or an input that is always 0) must not
        # make the system singular.
        gram = design.T @ design + 1e-6 * torch.eye(design.shape[1], dtype=p.dtype)
        solution = torch.linalg.solve(gram, design.T @ target)  # [C_in + 1, C_out]
        weight = (scale * solution[:-1].T).float().contiguous()
        bias = (1.0 + scale * solution[-1]).float().contiguous()
        fitted[name] = (weight, bias)
    return fitted
