"""Which layers are quantized how, and the latent-weight wiring used while training.

Every Conv/Linear weight the packer hands the method gets a precision: `low` (the method's
ternary / binary / k-bit grid), `int8`, or `fp32` (kept as it is, still trained). `auto`, the
default, gives the first and last Conv/Linear layer the `edges` precision (int8 unless set:
binarising them costs the most accuracy, and they hold few weights) and every other layer
`low`; `--set GLOB.precision=...` overrides it per layer.

While training, a quantized layer keeps its fp32 weight as the Parameter `latent_weight`
and a `weight_quantizer` submodule; a forward pre-hook sets `weight` to the quantized
value each call, so the layer's own forward (and DDP, and checkpoints) work unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from packer.methods.lowbit.quantizers import WeightQuantizer, quantize_activation_ste
from runtime.tensors import CompressedTensor

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
PRECISIONS = ("auto", "low", "int8", "fp32")
EDGE_PRECISIONS = ("int8", "fp32", "low")


def plan_precisions(model: nn.Module, targets: list[str],
                    option: Any) -> tuple[dict[str, str], list[str]]:
    """{module name: low | int8 | fp32} for every target weight of a Conv/Linear layer, and
    notes on targets that are not (left as they are). `option(weight name)` gives that
    weight's merged options."""
    modules = dict(model.named_modules())
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    edges = {layers[0], layers[-1]} if layers else set()
    plan: dict[str, str] = {}
    notes: list[str] = []
    for weight in targets:
        name = weight.rsplit(".", 1)[0] if "." in weight else ""
        if not weight.endswith("weight") or not isinstance(modules.get(name), LAYERS):
            notes.append(f"{weight}: not a Conv/Linear weight; left as it is")
            continue
        opts = option(weight)
        precision = opts["precision"]
        if precision == "auto":
            precision = opts["edges"] if name in edges else "low"
        plan[name] = precision
    return plan, notes


def _quantize_weight(module: nn.Module, _inputs: Any) -> None:
    module.weight = module.weight_quantizer(module.latent_weight)


def attach(module: nn.Module, quantizer: WeightQuantizer) -> None:
    """Make `module.weight` the quantized value of a trainable latent weight."""
    latent = module.weight
    del module.weight
    module.register_parameter("latent_weight", latent)
    module.weight_quantizer = quantizer.to(latent.device)
    module.weight = quantizer(latent).detach()
    module._lowbit_hook = module.register_forward_pre_hook(_quantize_weight)


def detach(module: nn.Module) -> CompressedTensor:
    """Undo `attach`: the packed form of the final weight, now a plain frozen Parameter."""
    latent = module.latent_weight.detach()
    tensor = module.weight_quantizer.compress(latent)
    module._lowbit_hook.remove()
    del module._lowbit_hook, module.weight_quantizer, module.latent_weight
    module.__dict__.pop("weight", None)
    module.weight = nn.Parameter(tensor.dequantize().to(latent.device), requires_grad=False)
    return tensor


class _QuantizeInput:
    """Training pre-hook: the runtime's activation quantizer, with a straight-through
    gradient."""

    def __init__(self, bits: int, clip: float) -> None:
        self.bits, self.clip = bits, clip

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (quantize_activation_ste(inputs[0], self.bits, self.clip), *inputs[1:])


def attach_input_quantizer(module: nn.Module, bits: int, clip: float) -> None:
    module._lowbit_input_hook = module.register_forward_pre_hook(_QuantizeInput(bits, clip))


def detach_input_quantizer(module: nn.Module) -> None:
    handle = module.__dict__.pop("_lowbit_input_hook", None)
    if handle is not None:
        handle.remove()
