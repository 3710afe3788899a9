"""Data-aware repair after post-training quantization (`--calib-data`, on by default).

- `bn`: BatchNorm running statistics re-estimated on the calibration images with the
  quantized weights in place (the statistics stored were measured on the full-precision
  network; quantization shifts and rescales every layer's output).
- `bias`: empirical bias correction (Nagel et al., ICCV 2019): the expected per-channel
  shift E[y_fp] - E[y_q] of a layer's output, measured layer by layer with the corrections
  of the layers before it in place, is added to its bias, or subtracted from the running
  mean of the BatchNorm that reads it. Where that BatchNorm is re-estimated anyway, its new
  mean already absorbs the shift, so only layers without one (the classifier) are corrected.

Both change tensors the packer stores raw (biases, BatchNorm buffers), so the file format is
untouched; a bias the method itself compressed is left alone.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from packer.ptq.graph import NORMS, following_norms
from packer.ptq.stats import StopForward, hooks
from packer.training.batchnorm import recalibrate_batchnorm
from runtime.tensors import CompressedTensor

BN_BATCH = 128


class _Images(Dataset):
    """Decoded calibration images as a data set (labels unused)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], 0


def reestimate_bn(model: nn.Module, images: Tensor, seed: int = 0) -> int:
    """Reset and re-measure every BatchNorm's running statistics on `images` with the
    training package's recalibration (cumulative average over batches of BN_BATCH, all else
    in eval mode); returns how many BatchNorms there are. The model stays on its device."""
    norms = sum(isinstance(m, NORMS) and m.track_running_stats for m in model.modules())
    if not norms:
        return 0
    device = next(model.parameters()).device
    recalibrate_batchnorm(model, _Images(images), int(images.shape[0]), BN_BATCH, 0, seed)
    model.to(device).eval()
    return norms


@torch.no_grad()
def output_mean(model: nn.Module, layer: str, batches: Iterable[Tensor]) -> Tensor:
    """Per-channel mean of `layer`'s output over the batches (positions included)."""
    total: Tensor | None = None
    count = 0

    def hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        nonlocal total, count
        channels = out.transpose(0, 1).reshape(out.shape[1], -1) if out.dim() > 2 else out.t()
        part = channels.double().sum(1)
        total = part if total is None else total + part
        count += channels.shape[1]
        raise StopForward

    with hooks([model.get_submodule(layer).register_forward_hook(hook)]):
        for batch in batches:
            with contextlib.suppress(StopForward):
                model(batch)
    if total is None:
        raise RuntimeError(f"layer {layer} was not called by the model's forward")
    return (total / count).float()


def correct_biases(quant: nn.Module, fp: nn.Module, layers: list[str],
                   batches: list[Tensor], raw: set[str],
                   bn_reestimated: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Empirical bias correction of `layers` (module names, execution order) in `quant`."""
    norms = following_norms(fp)
    corrected: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for layer in layers:
        module = quant.get_submodule(layer)
        norm = norms.get(layer)
        if norm is not None and bn_reestimated:
            continue  # the re-estimated BatchNorm mean already absorbed the shift
        if getattr(module, "bias", None) is not None and f"{layer}.bias" in raw:
            target = "bias"
        elif norm is not None and f"{norm}.running_mean" in raw:
            target = "running_mean"
        else:
            skipped[layer] = ("its bias is compressed by the method" if
                              getattr(module, "bias", None) is not None else
                              "no bias and no BatchNorm after it to hold a correction")
            continue
        delta = output_mean(fp, layer, batches) - output_mean(quant, layer, batches)
        with torch.no_grad():
            if target == "bias":
                module.bias += delta.to(module.bias.dtype)
            else:
                quant.get_submodule(norm).running_mean -= delta
        corrected[layer] = {"into": f"{layer}.bias" if target == "bias" else
                            f"{norm}.running_mean", "max_abs_shift": round(float(
                                delta.abs().max()), 6)}
    return corrected, skipped


def repair(model: nn.Module, reference: nn.Module, state_dict: dict[str, Tensor],
           compressed: dict[str, CompressedTensor], batches: list[Tensor],
           repairs: tuple[str, ...]) -> dict[str, Any]:
    """Apply `repairs` to the quantized network and write what changed (BatchNorm buffers,
    biases stored raw) back into `state_dict`. `model` has the layout of the compressed
    weights; `reference` is the full-precision network in that same layout."""
    started = time.perf_counter()
    quant = copy.deepcopy(model).eval()
    values = dict(state_dict)
    values.update({n: t.dequantize() for n, t in compressed.items()})
    quant.load_state_dict(values)
    raw = set(state_dict) - set(compressed)
    report: dict[str, Any] = {"repairs": list(repairs),
                              "images": int(sum(b.shape[0] for b in batches))}
    bn = 0
    if "bn" in repairs:
        bn = reestimate_bn(quant, torch.cat(batches))
        report["bn_reestimated"] = bn
    if "bias" in repairs:
        layers = [n.rsplit(".", 1)[0] for n in compressed
                  if n.endswith(".weight") and isinstance(
                      quant.get_submodule(n.rsplit(".", 1)[0]), (nn.Conv1d, nn.Conv2d,
                                                                  nn.Conv3d, nn.Linear))]
        order = [n for n, _ in quant.named_modules() if n in set(layers)]
        corrected, skipped = correct_biases(quant, reference.eval(), order, batches, raw,
                                            bn > 0)
        report["bias_corrected"] = corrected
        if skipped:
            report["bias_not_corrected"] = skipped
    for name, value in quant.state_dict().items():
        if name in raw and not torch.equal(value, state_dict[name]):
            state_dict[name] = value.detach().clone()
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
