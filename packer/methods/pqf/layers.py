"""Which layers PQF quantizes and how: sub-vector size, codebook size, and the PQ weight.

A layer's weight (C_out, C_in, kh, kw) is read row-major and cut into contiguous runs of d
values; with d a multiple of kh*kw a run is d/(kh*kw) whole kernels of consecutive input
channels, exactly the reference's layout and the packed format's VectorCodebook layout 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from runtime.tensors import VectorCodebookTensor

PQ_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerPlan:
    """One layer's product-quantization settings, and what happened to it."""

    name: str  # module name
    d: int  # sub-vector size
    k: int  # codebook size K actually used
    n: int  # number of sub-vectors (= codes)
    shape: tuple[int, ...]
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"


def preferred_d(module: nn.Module, opts: dict[str, Any]) -> int:
    """The reference's sub-vector size for a layer kind (or the explicit `subvector_size`)."""
    if opts.get("subvector_size"):
        return int(opts["subvector_size"])
    if isinstance(module, nn.Linear):
        return int(opts["fc_subvector_size"])
    kernel = math.prod(module.kernel_size)
    if kernel == 1:
        return int(opts["pw_subvector_size"])
    return kernel * (2 if opts["large_subvectors"] else 1)


def fallback_d(row: int, d: int, kernel: int) -> int | None:
    """The largest sub-vector size <= d that divides a row, preferring whole kernels."""
    if row % d == 0:
        return d
    whole = [c for c in range(d - 1, 1, -1) if row % c == 0 and c % kernel == 0]
    if whole:
        return whole[0]
    any_size = [c for c in range(d - 1, 1, -1) if row % c == 0]
    return any_size[0] if any_size else None


def codebook_size(k: int, n: int) -> int:
    """K = min(k, largest power of two <= n/4) (the reference's rule); 0 if below 2."""
    if n < 8:
        return 0
    return min(k, 1 << int(math.floor(math.log2(n / 4))))


def plan_layer(name: str, module: nn.Module, opts: dict[str, Any]) -> tuple[LayerPlan | None,
                                                                               str | None]:
    """A plan for one layer, or (None, why it stays uncompressed)."""
    weight = module.weight
    if getattr(module, "groups", 1) != 1:
        return None, f"{name}: grouped convolution (groups={module.groups}) left uncompressed"
    c_out = int(weight.shape[0])
    row = weight.numel() // c_out
    kernel = math.prod(module.kernel_size) if not isinstance(module, nn.Linear) else 1
    want = preferred_d(module, opts)
    notes: list[str] = []
    if want > row:
        d = fallback_d(row, row, kernel)
        if d is None:
            return None, f"{name}: rows of {row} values are shorter than one sub-vector " \
                         f"(d={want}); left uncompressed"
        notes.append(f"d={want} is longer than a row of {row}; used d={d}")
    else:
        d = fallback_d(row, want, kernel)
        if d is None:
            return None, f"{name}: no sub-vector size <= {want} divides its rows of {row} " \
                         f"values; left uncompressed"
        if d != want:
            notes.append(f"rows of {row} values are not divisible by d={want}; used d={d}")
    n = weight.numel() // d
    k = codebook_size(int(opts["k"]), n)
    if k < 2:
        return None, f"{name}: only {n} sub-vectors of {d} (fewer than 8); left uncompressed"
    if k < int(opts["k"]):
        notes.append(f"k={opts['k']} capped to K={k} ({n} sub-vectors, K <= n/4)")
    return LayerPlan(name, d, k, n, tuple(int(s) for s in weight.shape), notes), None


# --- the PQ weight used while fine-tuning ---------------------------------------------------


def _decode_weight(module: nn.Module, _inputs: Any) -> None:
    """Forward pre-hook: rebuild `weight` from the trainable codebook and the frozen codes."""
    flat = module.weight_codebook[module.weight_codes]
    module.weight = flat.reshape(module.weight_shape)


def attach_pq(module: nn.Module, codebook: Tensor, codes: Tensor) -> None:
    """Replace the module's weight Parameter by a codebook Parameter and frozen codes.

    Only the codebook (not the weight) then receives gradients, which is PQF's fine-tuning.
    """
    shape = tuple(module.weight.shape)
    del module.weight
    module.weight_shape = shape
    module.weight_codebook = nn.Parameter(codebook.detach().clone().float())
    module.register_buffer("weight_codes", codes.detach().clone().long())
    module.weight = module.weight_codebook[module.weight_codes].reshape(shape).detach()
    module._pq_hook = module.register_forward_pre_hook(_decode_weight)


def detach_pq(module: nn.Module, fp16: bool) -> VectorCodebookTensor:
    """Undo `attach_pq`: the final compressed tensor, and a plain decoded weight Parameter."""
    device = module.weight_codebook.device
    codebook = module.weight_codebook.detach().cpu()
    codebook = codebook.half() if fp16 else codebook.float()
    tensor = VectorCodebookTensor(codebook.contiguous(),
                                  module.weight_codes.detach().cpu().reshape(-1).clone(),
                                  tuple(module.weight_shape), torch.float32)
    module._pq_hook.remove()
    del module._pq_hook, module.weight_codebook, module.weight_codes
    if "weight" in module.__dict__:
        del module.__dict__["weight"]
    module.weight = nn.Parameter(tensor.dequantize().to(device), requires_grad=False)
    del module.weight_shape
    return tensor


def subvectors(weight: Tensor, d: int) -> Tensor:
    """The row-major weight as [numel/d, d] runs (layout 0)."""
    return weight.detach().reshape(-1, d)
