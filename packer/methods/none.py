"""`none`: the lossless baseline, every tensor raw (fp32, or fp16 with --set fp16=true)."""

from __future__ import annotations

from typing import Any

import torch

from packer.methods.base import PerTensorMethod
from runtime.tensors import RawTensor


def raw_tensor(weight: torch.Tensor, fp16: bool) -> RawTensor:
    """Keep a tensor as it is, at float16 when asked and the tensor is floating point."""
    store = weight.to(torch.float16) if fp16 and weight.is_floating_point() else weight
    return RawTensor(store.contiguous(), weight.dtype)


class NoneMethod(PerTensorMethod):
    name = "none"
    summary = "lossless baseline: raw fp32 (or --set fp16=true), entropy-coded"
    options = {}

    def post_training(self, job) -> bool:
        return False  # nothing was quantized: nothing to repair

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> RawTensor:
        return raw_tensor(weight, opts["fp16"])
