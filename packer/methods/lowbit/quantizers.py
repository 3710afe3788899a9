"""Low-bit weight quantizers: each paper's forward value and backward rule, and the packed form.

A quantizer maps a layer's latent fp32 weight to the weight the layer computes with
(`forward`, differentiable by the method's rule) and to the compressed tensor the packer
stores (`compress`). Both are computed from the same integers and scales with the same
float32 arithmetic as `runtime.tensors` dequantizes them, so the trained model and the
packed file agree bit for bit.

* TTQ (Zhu et al. 2017): w = +W_p where w~ > d, -W_n where w~ < -d, else 0, d = t * max|w~|;
  dL/dW_p = SUM over the positive set of dL/dw, dL/dW_n = -SUM over the negative set (W_n
  is a positive magnitude), dL/dw~ = W_p g, g, W_n g on the positive, zero, negative sets.
  (The reference takes the MEAN over all elements and multiplies the negative set by its
  negative W_n, flipping that gradient's sign: documented bugs, not reproduced.)
* BWN (XNOR-Net weights): w = a * sign(w~), a = mean|w~| per layer or per output filter
  (a constant for the gradient), sign(0) = +1 so the layer stays binary; straight-through
  gradient, zero where |w~| > a (the reference's clipping).
* DoReFa weights, k >= 2: w = s * (2 * round(n * w_n) / n - 1), w_n = tanh(w~) / (2 max|tanh
  w~|) + 1/2, n = 2^k - 1, gradient straight through the rounding and back through tanh
  (max detached); s = max|tanh w~| (detached) is our addition: the paper's levels are
  +-1-scale, which changes nothing when BatchNorm follows (train mode normalises it away)
  but would leave the pretrained BatchNorm statistics and any layer without BatchNorm
  wrong by a large constant factor. k = 1: w = E|w~| * sign(w~), plain straight-through.
* int8 (first and last layers by default): the `int8` method's per-channel grid,
  straight-through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Function

from packer.methods.uniform import quantize_symmetric
from runtime.activation_quant import quantize_activation
from runtime.tensors import CompressedTensor, ScalarCodebookTensor, UniformTensor

__all__ = ["BinaryQuantizer", "DoReFaQuantizer", "Int8Quantizer", "TernaryQuantizer",
           "WeightQuantizer", "dorefa_levels"]


class _Surrogate(Function):
    """Forward: `value` (already quantized); backward: the gradient times `gain` (a mask or
    a factor; None: 1) goes to `latent`. The forward value is `value` exactly, unlike the
    `latent + (value - latent).detach()` idiom, which rounds."""

    @staticmethod
    def forward(ctx: Any, latent: Tensor, value: Tensor, gain: Tensor | None) -> Tensor:
        ctx.save_for_backward(gain)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (gain,) = ctx.saved_tensors
        return (grad if gain is None else grad * gain), None, None


class _Ternary(Function):
    """TTQ's ternary weight with the paper's gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, latent: Tensor, wp: Tensor, wn: Tensor, delta: Tensor) -> Tensor:
        pos, neg = latent > delta, latent < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        zero = torch.zeros((), dtype=latent.dtype, device=latent.device)
        return torch.where(pos, wp, torch.where(neg, -wn, zero))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        pos, neg, wp, wn = ctx.saved_tensors
        gain = torch.where(pos, wp, torch.where(neg, wn, torch.ones_like(wp)))
        grad_wp = torch.where(pos, grad, 0.0).sum().reshape(wp.shape)
        grad_wn = -torch.where(neg, grad, 0.0).sum().reshape(wn.shape)
        return grad * gain, grad_wp, grad_wn, None


class WeightQuantizer(nn.Module):
    """latent weight -> (quantized weight with the method's gradient, packed form)."""

    kind: str = ""

    def compress(self, latent: Tensor) -> CompressedTensor:
        raise NotImplementedError

    def stats(self, latent: Tensor) -> dict[str, Any]:
        """What the report shows for this layer."""
        return {}


class TernaryQuantizer(WeightQuantizer):
    """TTQ: trainable W_p, W_n per layer, threshold t * max|w~|.

    The scales start at the mean magnitude of the weights above / below the threshold (the
    least-squares scale for that assignment), not at the reference's U(0, 1) draw, which
    throws the pretrained model away."""

    kind = "ternary"

    def __init__(self, latent: Tensor, threshold: float) -> None:
        super().__init__()
        self.threshold = float(threshold)
        w = latent.detach().float()
        delta = self.delta(w)
        pos, neg = w[w > delta], -w[w < -delta]
        peak = float(w.abs().max()) if w.numel() else 0.0
        self.wp = nn.Parameter(torch.tensor(float(pos.mean()) if pos.numel() else peak))
        self.wn = nn.Parameter(torch.tensor(float(neg.mean()) if neg.numel() else peak))

    def delta(self, latent: Tensor) -> Tensor:
        return self.threshold * latent.detach().abs().max()

    def forward(self, latent: Tensor) -> Tensor:
        return _Ternary.apply(latent, self.wp, self.wn, self.delta(latent))

    def indices(self, latent: Tensor) -> Tensor:
        """0: -W_n, 1: zero, 2: +W_p (the codebook's order)."""
        delta = self.delta(latent)
        return (latent > delta).long() * 2 + (latent.abs() <= delta).long()

    def compress(self, latent: Tensor) -> ScalarCodebookTensor:
        latent = latent.detach()
        wp, wn = self.wp.detach().reshape(()), self.wn.detach().reshape(())
        codebook = torch.stack([-wn, torch.zeros_like(wn), wp]).float().cpu()
        return ScalarCodebookTensor(codebook, self.indices(latent).cpu(), latent.dtype)

    def stats(self, latent: Tensor) -> dict[str, Any]:
        counts = torch.bincount(self.indices(latent.detach()).reshape(-1), minlength=3)
        total = max(1, int(counts.sum()))
        return {"wp": self.wp.item(), "wn": self.wn.item(), "threshold": self.threshold,
                "zero_fraction": round(int(counts[1]) / total, 4),
                "positive_fraction": round(int(counts[2]) / total, 4)}

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class BinaryQuantizer(WeightQuantizer):
    """alpha * sign(w~); alpha = mean|w~| per layer or per output channel (a constant).

    `clip_grad`: zero gradient where |w~| > alpha (BWN); off, plain straight-through
    (DoReFa's 1-bit weights). `half_scales`: per-channel alphas rounded to float16, in training
    and in the packed file alike (format feature `half_scales`): half the bytes of the scales,
    which are most of what BWN-F adds over per-layer BWN."""

    kind = "binary"

    def __init__(self, per_channel: bool = False, clip_grad: bool = True,
                 half_scales: bool = False) -> None:
        super().__init__()
        self.per_channel, self.clip_grad = per_channel, clip_grad
        self.half_scales = half_scales and per_channel

    def alpha(self, latent: Tensor) -> Tensor:
        w = latent.detach()
        if self.per_channel and w.dim() > 1:
            alpha = w.abs().reshape(w.shape[0], -1).mean(dim=1).reshape(-1, *[1] * (w.dim() - 1))
            return alpha.to(torch.float16).to(w.dtype) if self.half_scales else alpha
        return w.abs().mean()

    def forward(self, latent: Tensor) -> Tensor:
        alpha = self.alpha(latent)
        value = torch.where(latent.detach() >= 0, alpha, -alpha)
        gain = (latent.detach().abs() <= alpha).to(latent.dtype) if self.clip_grad else None
        return _Surrogate.apply(latent, value, gain)

    def compress(self, latent: Tensor) -> CompressedTensor:
        latent = latent.detach().cpu()
        alpha = self.alpha(latent).float()
        positive = latent >= 0
        if self.per_channel and latent.dim() > 1:
            # One scale per output channel cannot be a 2-entry codebook; the uniform grid's
            # codes -1/+1 (2-bit alphabet, 2 symbols used) entropy-code to ~1 bit per weight.
            codes = torch.where(positive, 1, -1).to(torch.int32)
            scales = alpha.reshape(-1).to(torch.float16 if self.half_scales else torch.float32)
            return UniformTensor(codes, scales, None, 2, 0, latent.dtype)
        # Per layer: two codebook entries, an alphabet of 2, so even plain bit-packing
        # stores exactly one bit per weight, with no coder table.
        codebook = torch.stack([-alpha, alpha]).reshape(2)
        return ScalarCodebookTensor(codebook, positive.long(), latent.dtype)

    def stats(self, latent: Tensor) -> dict[str, Any]:
        alpha = self.alpha(latent)
        return {"alpha_mean": float(alpha.mean()),
                "clipped_fraction": round(float((latent.detach().abs() > alpha).float().mean()),
                                          4)}

    def extra_repr(self) -> str:
        return (f"per_channel={self.per_channel}, clip_grad={self.clip_grad}"
                + (", half_scales=True" if self.half_scales else ""))


def dorefa_levels(bits: int) -> int:
    """n = 2^k - 1: the grid has n + 1 levels, odd codes -n, -n + 2, ..., n."""
    return (1 << bits) - 1


class DoReFaQuantizer(WeightQuantizer):
    """DoReFa k-bit weights by the tanh normalisation (k >= 2; k = 1 is BinaryQuantizer)."""

    kind = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError("DoReFaQuantizer takes 2..8 bits; 1 bit is BinaryQuantizer")
        self.bits = bits

    def _parts(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w_n with its graph, odd integer codes, step = s / n)."""
        n = dorefa_levels(self.bits)
        t = torch.tanh(latent)
        peak = t.detach().abs().max().clamp_min(torch.finfo(t.dtype).tiny)
        normalised = t / (2 * peak) + 0.5
        codes = 2 * torch.round(normalised.detach() * n) - n
        return normalised, codes, (peak / n).to(torch.float32)

    def forward(self, latent: Tensor) -> Tensor:
        normalised, codes, step = self._parts(latent)
        value = codes * step  # = s * (2 q - 1), q = round(n w_n) / n
        # d value / d w_n = 2 n step = 2 s through the rounding (straight-through).
        return _Surrogate.apply(normalised, value, 2 * dorefa_levels(self.bits) * step)

    def compress(self, latent: Tensor) -> UniformTensor:
        # A uniform grid: one 4-byte scale instead of 2^k codebook entries. Codes are odd
        # integers in [-n, n] (bits k + 1); the unused even symbols cost nothing under the
        # Huffman and ANS coders, which `auto` picks over plain bit-packing.
        latent = latent.detach().cpu()
        _, codes, step = self._parts(latent)
        return UniformTensor(codes.to(torch.int32), step.reshape(1), None, self.bits + 1, None,
                             latent.dtype)

    def stats(self, latent: Tensor) -> dict[str, Any]:
        _, codes, step = self._parts(latent.detach())
        return {"bits": self.bits, "step": float(step),
                "levels_used": int(torch.unique(codes).numel())}

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class Int8Quantizer(WeightQuantizer):
    """The `int8` method's grid (symmetric, per output channel, max scaling), trained
    through straight-through, for the first and last layers."""

    kind = "int8"

    def forward(self, latent: Tensor) -> Tensor:
        value = quantize_symmetric(latent.detach(), 8, per_channel=True).dequantize()
        return _Surrogate.apply(latent, value, None)

    def compress(self, latent: Tensor) -> UniformTensor:
        return quantize_symmetric(latent.detach().cpu(), 8, per_channel=True)


class _ActivationSTE(Function):
    """runtime's activation quantizer forward; gradient straight through the rounding and
    zero outside [0, clip] (the gradient of the clip itself)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int, clip: float) -> Tensor:
        ctx.save_for_backward((x >= 0) & (x <= clip))
        return quantize_activation(x, bits, clip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def quantize_activation_ste(x: Tensor, bits: int, clip: float) -> Tensor:
    return _ActivationSTE.apply(x, bits, clip)
