"""Second moments of layer inputs and output gradients, gathered on calibration images.

A Conv/Linear layer computes y_c = W_c . x at every output position, where x is the
position's input patch (for a convolution: `F.unfold` of its input). Everything the
post-training steps need about the data fits in small matrices:

- the input Gram matrix A = E[x x^T] (d x d per group, d = row length of W): the layer's
  output error for a weight error dW is E[(dW_c . x)^2] = dW_c A dW_c^T, so AdaRound can
  optimise the exact reconstruction error over all calibration images in O(C_out d^2) per
  step instead of a forward pass;
- the output-gradient energy S_c = E_image[sum_positions (dL/dy_c)^2] under labels drawn from
  the model's own prediction, which with A is the Kronecker-factored (K-FAC) Fisher of the
  layer: the expected KL increase of the output for dW is ~ 1/2 sum_c S_c dW_c A dW_c^T.

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


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class FisherStats:
    """K-FAC factors of one layer: input Gram A and per-channel output-gradient energy S."""

    gram: Tensor  # [g, d, d] or [g, d]
    grad_energy: Tensor  # [C_out]
    groups: int

    def kl_increase(self, delta: Tensor) -> float:
        """Second-order estimate of the mean output KL (nats/image) for weight error delta."""
        rows = weight_rows(delta.float())
        return 0.5 * float((self.grad_energy * quadratic(rows, self.gram, self.groups)).sum())


def fisher_stats(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Tensor],
                 seed: int) -> dict[str, FisherStats]:
    """K-FAC factors of every layer in `layers` from one forward/backward pass per batch, with
    labels drawn from the model's own softmax (the true Fisher, not the empirical one)."""
    grams = {n: Gram.empty(groups_of(m), weight_rows(m.weight).shape[1])
             for n, m in layers.items()}
    energy = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64)
              for n, m in layers.items()}
    inputs: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    images = 0

    def forward_hook(name: str, module: nn.Module):
        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[name] = args[0].detach()

            def grad_hook(grad: Tensor) -> None:
                channels = grad.transpose(0, 1).reshape(grad.shape[1], -1) \
                    if grad.dim() > 2 else grad.t()
                energy[name] += (channels.double() ** 2).sum(1)
            out.register_hook(grad_hook)
        return hook

    handles = [m.register_forward_hook(forward_hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    with hooks(handles), torch.enable_grad():
        for batch in batches:
            x = batch.detach().requires_grad_(True)  # so every layer's output needs a grad
            logits = model(x)
            probs = torch.softmax(logits.detach().double(), 1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            torch.autograd.grad(loss, x)  # fires the output hooks; no parameter gradients
            for name, module in layers.items():
                rows = patches(module, inputs.pop(name))
                grams[name].add(rows)
            images += batch.shape[0]
    model.train(was_training)
    return {n: FisherStats(grams[n].mean(), (energy[n] / max(1, images)).float(),
                           groups_of(m)) for n, m in layers.items()}
