"""The reference's analytic size rule, so users can compare our true bytes with the paper.

Reproduces uber-research/permute-quantize-finetune bit for bit: BatchNorm folded to two fp32
vectors (running statistics dropped), codebooks at fp16 (16 bits x K x d), codes at log2(K)
bits each, everything else at 32 bits; the uncompressed figure is every learnable parameter
at 32 bits. MiB = bits / 8 / 2^20, as in its README (which calls them MB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from packer.methods.pqf.layers import LayerPlan

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def reference_size(model: nn.Module, plans: Mapping[str, LayerPlan]) -> dict[str, float | int]:
    """`reference_bits`, `reference_mib`, `reference_ratio` (and the uncompressed bits)."""
    uncompressed = 32 * sum(p.numel() for p in _learnable(model))
    bits = 0
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, _BN):
            bits += 2 * 32 * module.num_features  # folded scale and shift
            continue
        plan = plans.get(name)
        for pname, param in own.items():
            if plan is not None and pname in ("weight", "weight_codebook"):
                bits += 16 * plan.k * plan.d + int(math.log2(plan.k)) * plan.n
            else:
                bits += 32 * param.numel()
        if plan is not None and "weight" not in own and "weight_codebook" not in own:
            bits += 16 * plan.k * plan.d + int(math.log2(plan.k)) * plan.n
    return {
        "reference_bits": bits,
        "reference_mib": round(bits / 8 / 2**20, 2),
        "reference_ratio": round(uncompressed / bits, 2),
        "reference_uncompressed_bits": uncompressed,
    }


def _learnable(model: nn.Module) -> list[nn.Parameter]:
    """All parameters, counting a PQ layer's weight at its original size."""
    out = []
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname == "weight_codebook":
                out.append(nn.Parameter(param.new_empty(module.weight_shape), False))
            else:
                out.append(param)
    return out
