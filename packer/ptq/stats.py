"""What the post-training steps measure on calibration images, per Conv/Linear layer.

A Conv/Linear layer computes y_c = W_c . x at every output position, where x is the
position's input patch (for a convolution: `F.unfold` of its input). So:

- the input Gram matrix A = E[x x^T] (d x d per group, d = row length of W): the layer's
  output error for a weight error dW is E[(dW_c . x)^2] = dW_c A dW_c^T, so AdaRound can
  optimise the exact reconstruction error over all calibration images in O(C_out d^2) per
  step instead of a forward pass;
- per-sample weight gradients (sum over positions of g x^T, g the output gradient),
  projected on candidate weight errors dW, give the Fisher quadratic form
  1/2 E_x E_{y~p(x)}[<dW, grad log p_y>^2]: the second-order increase of the output KL
  divergence when that layer alone changes by dW (`fisher_quadratics`).

Conv1d, Conv2d and Linear are supported (any groups, padding mode, stride, dilation);
rows longer than MAX_GRAM_DIM keep only the diagonal of A, to bound memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_GRAM_DIM = 4608  # ResNet-50's widest 3x3 row (512 x 9): 85 MB of float32 per group


def supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


def groups_of(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def weight_rows(weight: Tensor) -> Tensor:
    """[C_out, d]: one row per output channel."""
    return weight.reshape(weight.shape[0], -1)


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as [groups, positions, d] rows, so that y = rows @ W_group^T."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[None]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
        dilation = (1, module.dilation[0])
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    pad = module._reversed_padding_repeated_twice  # covers 'same' and non-zero modes
    if isinstance(module, nn.Conv1d):
        pad = [pad[0], pad[1], 0, 0]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, C_in*k, L]
    g = groups_of(module)
    b, dk, length = cols.shape
    return cols.reshape(b, g, dk // g, length).permute(1, 0, 3, 2).reshape(g, b * length,
                                                                           dk // g)


@dataclass
class Gram:
    """E[x x^T] per group ([g, d, d]; [g, d] when only the diagonal is kept)."""

    matrix: Tensor
    count: int = 0

    @property
    def diagonal_only(self) -> bool:
        return self.matrix.dim() == 2

    @classmethod
    def empty(cls, groups: int, d: int) -> Gram:
        shape = (groups, d) if d > MAX_GRAM_DIM else (groups, d, d)
        return cls(torch.zeros(shape, dtype=torch.float64))

    def add(self, rows: Tensor, other: Tensor | None = None) -> None:
        """Accumulate rows^T other (other defaults to rows) over the positions."""
        other = rows if other is None else other
        if self.diagonal_only:
            self.matrix += (rows * other).sum(1).double()
        else:
            self.matrix += torch.bmm(rows.transpose(1, 2), other).double()
        self.count += rows.shape[1]

    def mean(self) -> Tensor:
        return (self.matrix / max(1, self.count)).float()


def quadratic(rows: Tensor, gram: Tensor, groups: int, other: Tensor | None = None) -> Tensor:
    """Per output channel c: rows_c G other_c^T (other defaults to rows), G of its group."""
    other = rows if other is None else other
    c_out, d = rows.shape
    r = rows.reshape(groups, c_out // groups, d)
    o = other.reshape(groups, c_out // groups, d)
    if gram.dim() == 2:  # diagonal only
        return ((r * gram[:, None, :]) * o).sum(-1).reshape(c_out)
    return (torch.bmm(r, gram) * o).sum(-1).reshape(c_out)


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module],
                batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """E[x x^T] of every layer's input in one pass of the (unchanged) model."""
    grams = {n: Gram.empty(groups_of(m), weight_rows(m.weight).shape[1])
             for n, m in layers.items()}

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            grams[name].add(patches(module, args[0]))
        return hook

    with hooks([m.register_forward_pre_hook(pre_hook(n)) for n, m in layers.items()]):
        for batch in batches:
            model(batch)
    return {n: g.mean() for n, g in grams.items()}


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sample_patches(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input per sample: [groups, batch, positions, d]."""
    batch = x.shape[0]
    rows = patches(module, x)
    return rows.reshape(rows.shape[0], batch, -1, rows.shape[-1])


def sample_grads(module: nn.Module, grad: Tensor) -> Tensor:
    """The output gradient per sample: [groups, batch, positions, C_out / groups]."""
    g = groups_of(module)
    batch, c_out = grad.shape[0], grad.shape[1] if grad.dim() > 1 else 1
    if isinstance(module, nn.Linear):
        per = grad.reshape(batch, -1, grad.shape[-1])
    else:
        per = grad.reshape(batch, c_out, -1).transpose(1, 2)
    return per.reshape(batch, per.shape[1], g, -1).permute(2, 0, 1, 3)


TOP_CLASSES = 4  # per image, the expectation over labels runs over its most probable ones


def fisher_quadratics(model: nn.Module, deltas: dict[str, list[Tensor]],
                      batches: Iterable[Tensor], stats: dict[str, float] | None = None,
                      top: int = TOP_CLASSES) -> dict[str, list[float]]:
    """For every weight error dW of every layer (layer name -> errors):
    1/2 E_x E_{y~p(x)} [<dW, d log p_y(x) / dW>^2], the Fisher quadratic form, which is the
    second-order expansion of the output KL divergence when that layer alone changes by dW.

    The Fisher in logit space is diag(p) - p p^T = sum_c u_c u_c^T with
    u_c = sqrt(p_c) (e_c - p): one backward pass per class with output gradient u_c gives
    E_y exactly. Passes run over each image's TOP_CLASSES most probable classes (rank by
    rank); a class of probability p_c adds O(p_c), and the probability mass left out is
    returned in `stats["mass_left_out"]`. (Drawing labels instead was far too noisy with
    confident models.) Per-sample weight gradients (sum over positions of g x^T, so
    spatially coherent errors count as in the output) are projected on every dW as they
    come and never stored.
    """
    modules = {n: model.get_submodule(n) for n in deltas}
    rows = {n: torch.stack([weight_rows(d.float()) for d in ds]) for n, ds in deltas.items()}
    sums = {n: torch.zeros(len(ds), dtype=torch.float64) for n, ds in deltas.items()}
    inputs: dict[str, Tensor] = {}
    images = 0
    left_out = 0.0

    def forward_hook(name: str):
        module = modules[name]

        def project(grad: Tensor) -> None:
            x = sample_patches(module, inputs[name])  # [g, B, L, d]
            gy = sample_grads(module, grad)  # [g, B, L, C/g]
            g, batch, d = x.shape[0], x.shape[1], x.shape[-1]
            cand = rows[name].reshape(rows[name].shape[0], g, -1, d)  # [K, g, C/g, d]
            # Per-sample gradients sum_t g_t x_t^T, a chunk of samples at a time.
            step = max(1, (1 << 24) // max(1, g * cand.shape[2] * d))
            for start in range(0, batch, step):
                grads = torch.einsum("gbld,gblc->gbcd", x[:, start:start + step],
                                     gy[:, start:start + step])
                proj = torch.einsum("gbcd,kgcd->kb", grads, cand)  # <dW_k, grad> per sample
                sums[name] += (proj.double() ** 2).sum(1)

        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[name] = args[0].detach()
            out.register_hook(project)
        return hook

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    with hooks(handles), torch.enable_grad():
        for batch in batches:
            x = batch.detach().requires_grad_(True)  # so every layer's output needs a grad
            logits = model(x)
            p = torch.softmax(logits.detach().double(), 1)
            ranked = p.argsort(1, descending=True)[:, :top]
            directions = []
            for r in range(ranked.shape[1]):
                c = ranked[:, r:r + 1]
                onehot = torch.zeros_like(p).scatter_(1, c, 1.0)
                directions.append(p.gather(1, c).sqrt() * (onehot - p))
            left_out += float((1 - p.gather(1, ranked).sum(1)).sum())
            for i, u in enumerate(directions):
                torch.autograd.grad(logits, x, grad_outputs=u.to(logits.dtype),
                                    retain_graph=i + 1 < len(directions))
            inputs.clear()
            images += batch.shape[0]
    model.train(was_training)
    if stats is not None:
        stats["mass_left_out"] = left_out / max(1, images)
    return {n: [0.5 * float(v) / max(1, images) for v in sums[n]] for n in deltas}
