"""The symmetric uniform grid by its largest magnitude: one home for the max / qmax rule.

Per row (an output channel, or the whole tensor as one row): scale = max|w| / qmax, and
code = round-half-to-even(w / scale) clipped to [-qmax, qmax], zero point 0. At 8 bits
(qmax 127) this is TensorRT's weight grid. An all-zero row gets scale 1 so no division by zero
reaches a file. The packer's `uniform`/`int8` methods and the runtime's int8 conversion both
use it, so a weight quantized by either lands on the same codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["max_scales", "round_to_grid"]


def max_scales(rows: Tensor, qmax: int) -> Tensor:
    """float32 scale per row of a float32 [rows, values] tensor: max|row| / qmax (1 if 0)."""
    scales = rows.abs().amax(dim=1) / qmax
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def round_to_grid(rows: Tensor, scales: Tensor, qmax: int) -> Tensor:
    """int32 codes of `rows` on the grid `scales` (one per row), clipped to [-qmax, qmax]."""
    return torch.clamp(torch.round(rows / scales[:, None]), -qmax, qmax).to(torch.int32)
