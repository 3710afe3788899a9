"""FBS channel gating (feature "channel_gating"): the arithmetic, defined once.

Feature Boosting and Suppression (Gao et al., ICLR 2019) gives a convolution with input x
[N, C_in, H, W] and C_out output channels a saliency predictor, and per image keeps the k
channels it ranks highest:

    s    = | W_g . mean_hw |x| + b_g |                       saliency, [N, C_out]
    rank = #{j : s_j > s_c} + #{j < c : s_j = s_c}          ties: the lower channel first
    mask = s * [rank < k]                                   exactly k kept, each boosted by s

The gated unit's output (the BatchNorm2d that alone reads the convolution, else the
convolution itself) is multiplied by `mask` per channel, so a suppressed channel is exactly
zero, as in the paper's eq. (6), and the next convolution need not read it either.

The rank rule, rather than `torch.topk`, because it says what happens on ties (torch's
topk does not) and is written with comparisons and a sum that ONNX expresses exactly
(Greater, Equal, And, Or, ReduceSum, Less): torch, the exported graph and onnxruntime keep
the same channels. (The reference thresholds at the k-th largest value with a strict `>`,
which keeps k - 1 channels.) It costs C_out^2 comparisons per image: 4,096 for 64
channels, against the 2.4 million multiply-accumulates of one 64-channel 3x3 conv at 8x8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelGate", "conv_output_size", "keep_count", "keep_top_k", "pool", "predict",
           "saliency"]

GATE_CHILD = "gate"
"""A gated Conv2d holds its ChannelGate as this child: tensors `<conv>.gate.weight`, `.bias`."""


def conv_output_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """(height, width) of `conv`'s output on an input of height x width."""
    if conv.padding == "same":
        return height, width
    pads = (0, 0) if conv.padding == "valid" else conv.padding
    h, w = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
            zip((height, width), pads, conv.dilation, conv.kernel_size, conv.stride, strict=True))
    return max(0, h), max(0, w)



def keep_count(channels: int, ratio: float) -> int:
    """k for a keep ratio: round(C * ratio) half to even (as the reference's np.round), at
    least 1."""
    return max(1, min(channels, round(channels * ratio)))


def pool(x: Tensor) -> Tensor:
    """mean_hw |x|, [N, C_in]: the predictor's input; zero exactly for an all-zero channel
    (which the batch-1 path and the MAC count then skip)."""
    return x.abs().mean(dim=(2, 3))


def predict(pooled: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """|Linear(pooled)|: one non-negative saliency per output channel and image."""
    return F.linear(pooled, weight, bias).abs()


def saliency(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """|Linear(mean_hw |x|)|."""
    return predict(pool(x), weight, bias)


def keep_top_k(s: Tensor, k: int, earlier: Tensor) -> Tensor:
    """Boolean [N, C]: the k largest of each row of `s`, ties to the lower channel index.

    `earlier[c, j]` is True where j < c (`torch.ones(C, C).tril(-1)`)."""
    ahead = s.unsqueeze(1) > s.unsqueeze(2)  # [N, c, j]: s_j > s_c
    tied_before = (s.unsqueeze(1) == s.unsqueeze(2)) & earlier
    rank = (ahead | tied_before).sum(dim=2)
    return rank < k


class ChannelGate(nn.Module):
    """The saliency predictor of one convolution; returns the [N, C_out, 1, 1] mask.

    Initialised as the reference leaves its predictors (PyTorch's nn.Linear default:
    uniform in +-1/sqrt(C_in), weight and bias), from `generator` when given.
    """

    def __init__(self, in_channels: int, out_channels: int, keep: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= keep <= out_channels:
            raise ValueError(f"keep must be in 1..{out_channels}, not {keep}")
        self.in_channels, self.out_channels, self.keep = in_channels, out_channels, keep
        # On the meta device (the runtime's skeleton of a file's architecture) the predictor
        # is a placeholder that the file's tensors replace; nothing is allocated for it.
        device = torch.device(device or "cpu")
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, device=device))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device))
        # Not part of the state_dict: it is the tie rule, not a weight. Always real (a file
        # never supplies it), on the CPU when the predictor is a meta placeholder.
        real = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("earlier", torch.ones(out_channels, out_channels, dtype=torch.bool,
                                                   device=real).tril(-1), persistent=False)
        # Training reads the last saliencies (L1 penalty); a MAC counter observes each call
        # with (gate, x, pooled input, mask).
        self.last_saliency: Tensor | None = None
        self.observer: Callable[[ChannelGate, Tensor, Tensor, Tensor], None] | None = None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.weight.is_meta:
            return  # a placeholder: the file's tensors take its place
        bound = 1.0 / math.sqrt(self.in_channels)
        with torch.no_grad():
            # nn.Linear's kaiming_uniform_(a=sqrt(5)) is exactly this bound for the weight.
            self.weight.uniform_(-bound, bound, generator=generator)
            self.bias.uniform_(-bound, bound, generator=generator)

    def mask(self, pooled: Tensor) -> Tensor:
        """[N, C_out]: saliency where kept, 0 where suppressed."""
        s = predict(pooled, self.weight, self.bias)
        if self.training:
            self.last_saliency = s
        return s * keep_top_k(s, self.keep, self.earlier).to(s.dtype)

    def forward(self, x: Tensor) -> Tensor:
        pooled = pool(x)
        mask = self.mask(pooled)
        if self.observer is not None:
            self.observer(self, x, pooled, mask)
        return mask.unsqueeze(-1).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, keep={self.keep}"
