"""AdaRound (Nagel et al., ICML 2020): learn, per weight, whether to round down or up.

Each weight on the uniform grid becomes s * clip(floor(w/s) + h(V), -q, q) with the rectified
sigmoid h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, V
initialised so that h(V) equals the fractional part (the start is the unrounded weight).
Per layer, in execution order, V minimises

    sum_c w_c E[(W~_c x^ - W_c x)^2]  +  lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

where x^ is the layer's input with every preceding layer already quantized and x the
full-precision input (the paper's asymmetric reconstruction), w_c = (gamma_c / sigma_c)^2
when a BatchNorm reads the output (the error is measured after it, as with BN folded, as in
BRECQ) and 1 otherwise; lambda = 0.01, beta annealed linearly from 20 to 2 after a 20%
warm-up without the regulariser, Adam at lr 1e-3 (the paper's and BRECQ's settings). Then
every weight rounds up where h(V) >= 0.5.

The expectation is taken exactly over all calibration images through the input Gram
matrices (`packer.ptq.stats`): one step costs O(C_out d^2), independent of the number of
images, so a few thousand steps per layer run in seconds on a CPU. No labels are used, the
scales and bit widths stay those of nearest rounding (the grid does not change), and each
code moves by at most one step from nearest rounding.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from packer.ptq.graph import following_norms
from packer.ptq.stats import (
    Gram,
    StopForward,
    groups_of,
    hooks,
    patches,
    quadratic,
    supported,
    weight_rows,
)
from runtime.tensors import UniformTensor

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSettings:
    iters: int = 2000
    lam: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr: float = 1e-3


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: Tensor) -> Tensor:
    """V with rectified_sigmoid(V) == rest, for rest in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def beta_at(step: int, s: AdaRoundSettings) -> float | None:
    """The regulariser's exponent at `step`; None during the warm-up (no regulariser)."""
    warm = int(s.warmup * s.iters)
    if step < warm:
        return None
    rel = (step - warm) / max(1, s.iters - warm)
    return s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - rel)


@dataclass
class LayerProblem:
    """One layer's reconstruction problem, in rows of its weight."""

    weight: Tensor  # [C_out, d] full precision
    scales: Tensor  # [C_out, 1] (or [1, 1])
    qmax: int
    gram_q: Tensor  # E[x^ x^^T], [g, d, d] or diagonal [g, d]
    cross: Tensor  # E[x^ x^T]
    gram_fp: Tensor  # E[x x^T]
    groups: int
    channel_weight: Tensor  # [C_out]

    def __post_init__(self) -> None:
        # Cross term per channel: W~_c E[x^ x^T] W_c^T = W~_c . (W_c E[x^ x^T]^T).
        c_out, d = self.weight.shape
        g = self.groups
        w = self.weight.reshape(g, c_out // g, d)
        if self.cross.dim() == 2:
            proj = w * self.cross[:, None, :]
        else:
            proj = torch.bmm(w, self.cross.transpose(1, 2))
        self.proj = proj.reshape(c_out, d)
        self.const = quadratic(self.weight, self.gram_fp, g)
        self.base = torch.floor(self.weight / self.scales)

    def quantized(self, h: Tensor) -> Tensor:
        return self.scales * torch.clamp(self.base + h, -self.qmax, self.qmax)

    def error(self, w_hat: Tensor) -> Tensor:
        """sum_c w_c E[(W~_c x^ - W_c x)^2]: the exact weighted reconstruction error."""
        per_channel = (quadratic(w_hat, self.gram_q, self.groups)
                       - 2 * (w_hat * self.proj).sum(1) + self.const)
        return (self.channel_weight * per_channel).sum()


def reconstruct(problem: LayerProblem, nearest_codes: Tensor,
                s: AdaRoundSettings) -> tuple[Tensor, dict[str, Any]]:
    """Learned codes [C_out, d] for one layer, and what the optimisation did."""
    rest = problem.weight / problem.scales - problem.base
    v = initial_v(rest).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=s.lr)
    trace: list[float] = []
    for step in range(s.iters):
        h = rectified_sigmoid(v)
        rec = problem.error(problem.quantized(h))
        beta = beta_at(step, s)
        loss = rec if beta is None else rec + s.lam * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, s.iters // 20) == 0 or step == s.iters - 1:
            trace.append(float(loss.detach()))
    with torch.no_grad():
        codes = torch.clamp(problem.base + (v >= 0).float(), -problem.qmax, problem.qmax)
        before = float(problem.error(problem.scales * nearest_codes))
        after = float(problem.error(problem.scales * codes))
    stats = {"error_nearest": before, "error_adaround": after,
             "changed": round(float((codes != nearest_codes).float().mean()), 4),
             "objective": trace}
    return codes, stats


def _capture_input(model: nn.Module, layer: str, batch: Tensor) -> Tensor:
    got: list[Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise StopForward

    handle = model.get_submodule(layer).register_forward_pre_hook(pre_hook)
    with hooks([handle]), contextlib.suppress(StopForward):
        model(batch)
    if not got:
        raise RuntimeError(f"layer {layer} was not called by the model's forward")
    return got[0]


@torch.no_grad()
def pair_grams(fp: nn.Module, quant: nn.Module, layer: str,
               batches: Iterable[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """E[x^ x^^T], E[x^ x^T], E[x x^T] of `layer`'s input: x^ in `quant`, x in `fp`."""
    module = fp.get_submodule(layer)
    d = weight_rows(module.weight).shape[1]
    g = groups_of(module)
    gq, cross, gf = Gram.empty(g, d), Gram.empty(g, d), Gram.empty(g, d)
    for batch in batches:
        rq = patches(module, _capture_input(quant, layer, batch))
        rf = patches(module, _capture_input(fp, layer, batch))
        gq.add(rq)
        cross.add(rq, rf)
        gf.add(rf)
    return gq.mean(), cross.mean(), gf.mean()


def channel_weights(model: nn.Module, layer: str, norms: dict[str, str]) -> Tensor:
    """(gamma / sigma)^2 of the BatchNorm reading the layer's output, else ones."""
    module = model.get_submodule(layer)
    ones = torch.ones(module.weight.shape[0])
    if layer not in norms:
        return ones
    bn = model.get_submodule(norms[layer])
    if bn.running_var is None or bn.running_var.numel() != ones.numel():
        return ones
    gain = 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        gain = gain * bn.weight.detach().float()
    return gain ** 2


def learn_layer(module: nn.Module, nearest: UniformTensor, grams: tuple[Tensor, Tensor, Tensor],
                channel_weight: Tensor, settings: AdaRoundSettings
                ) -> tuple[UniformTensor, dict[str, Any]]:
    """AdaRound one layer on the grid of `nearest`, given its input Gram matrices
    (E[x^ x^^T], E[x^ x^T], E[x x^T])."""
    rows = weight_rows(module.weight.detach().float())
    scales = nearest.scales.float().reshape(-1, 1)
    problem = LayerProblem(rows, scales, (1 << (nearest.bits - 1)) - 1, *grams,
                           groups_of(module), channel_weight)
    codes, stats = reconstruct(problem, weight_rows(nearest.codes.float()), settings)
    learned = UniformTensor(codes.reshape(nearest.codes.shape).to(torch.int32),
                            nearest.scales, None, nearest.bits, nearest.axis, nearest.dtype)
    return learned, stats


def adaround_model(model: nn.Module, tensors: dict[str, UniformTensor],
                   learn: list[str], batches: list[Tensor], settings: AdaRoundSettings,
                   progress: bool = True) -> tuple[dict[str, UniformTensor], dict[str, Any]]:
    """AdaRound every weight in `learn` (tensor names, execution order), with every tensor in
    `tensors` quantized upstream. Returns the learned tensors and a per-layer report."""
    started = time.perf_counter()
    fp = model.eval()
    quant = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in learn:
                quant.get_parameter(name).copy_(tensor.dequantize())
    norms = following_norms(fp)
    out: dict[str, UniformTensor] = {}
    layers: dict[str, Any] = {}
    bar = tqdm(learn, desc="adaround", unit="layer", disable=not progress, leave=False)
    for name in bar:
        layer = name.rsplit(".", 1)[0]
        module = fp.get_submodule(layer)
        nearest = tensors[name]
        if not supported(module):
            layers[layer] = {"skipped": f"{type(module).__name__} is not supported; nearest "
                             f"rounding kept"}
            out[name] = nearest
            continue
        gq, cross, gf = pair_grams(fp, quant, layer, batches)
        learned, stats = learn_layer(module, nearest, (gq, cross, gf),
                                     channel_weights(fp, layer, norms), settings)
        out[name] = learned
        with torch.no_grad():
            quant.get_parameter(name).copy_(learned.dequantize())
        layers[layer] = {k: (round(v, 6) if isinstance(v, float) else v)
                         for k, v in stats.items() if k != "objective"}
        gain = stats["error_adaround"] / max(stats["error_nearest"], 1e-30)
        bar.set_postfix_str(f"{layer}: error x{gain:.2f}")
    report = {"adaround_layers": layers,
              "adaround_seconds": round(time.perf_counter() - started, 2),
              "adaround_images": int(sum(b.shape[0] for b in batches)),
              "adaround_iters": settings.iters}
    return out, report
