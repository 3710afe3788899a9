"""Activation quantization stored in a packed file (feature "activation_quant"), applied at
inference: DoReFa's k-bit activations, clipped to [0, clip] as the paper does.

`quantize_activation` is the one definition of the arithmetic: the packer trains through it
(with a straight-through gradient) and the runtime applies it, as a forward pre-hook on each
listed module, so the torch module and the ONNX graph exported from it (Clip, Mul, Round,
Div) compute the same thing. int8 inference (runtime.quant) cannot apply it and refuses
models that carry it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from runtime.errors import ArchitectureError
from runtime.format.records import ActivationQuantRecord

HOOK_ATTRIBUTE = "_weightpack_activation_quant"  # marks a module whose input is quantized


def quantize_activation(x: Tensor, bits: int, clip: float) -> Tensor:
    """round(clamp(x, 0, clip) * n / clip) / (n / clip), n = 2^bits - 1: levels 0, clip/n, ...,
    clip. Multiplying and dividing by the same float32 factor keeps the levels exact
    multiples of clip/n, and ONNX's Round rounds half to even like torch.round."""
    factor = ((1 << bits) - 1) / clip
    return torch.round(x.clamp(0.0, clip) * factor) / factor


class _InputQuantizer:
    """Forward pre-hook: quantize the module's first input."""

    def __init__(self, bits: int, clip: float) -> None:
        self.bits, self.clip = bits, clip

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (quantize_activation(inputs[0], self.bits, self.clip), *inputs[1:])


def apply_activation_quant(module: nn.Module,
                           quantizers: Iterable[ActivationQuantRecord]) -> nn.Module:
    """Install the file's activation quantizers on `module` (in place); every named module
    must exist, so a file cannot silently lose one."""
    modules = dict(module.named_modules())
    for q in quantizers:
        target = modules.get(q.module)
        if target is None or q.module == "":
            raise ArchitectureError(f"activation quantizer names module {q.module!r}, which "
                                    "the architecture does not have")
        if getattr(target, HOOK_ATTRIBUTE, None) is not None:
            raise ArchitectureError(f"module {q.module!r} already quantizes its input")
        handle = target.register_forward_pre_hook(_InputQuantizer(q.bits, q.clip))
        setattr(target, HOOK_ATTRIBUTE, (q, handle))
    return module


def activation_quantized(module: nn.Module) -> list[str]:
    """Names of the submodules of `module` whose inputs are quantized (empty: none)."""
    return [n for n, m in module.named_modules() if getattr(m, HOOK_ATTRIBUTE, None) is not None]
