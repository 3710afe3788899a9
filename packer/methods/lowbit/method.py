"""`ttq`, `bwn`, `dorefa`: low-bit quantization-aware training that ends in a packed file.

All three start from the pretrained checkpoint: quantize every layer (first and last at
int8 by default), re-estimate BatchNorm statistics on training images, train the latent
weights (and scales, BatchNorm, biases, kept layers) through the shared loop
(`packer.training.fit`: Adam or SGD, cosine learning rate stepped per batch, best epoch by
validation, resumable checkpoint, torchrun DDP), then hand the packer 3-entry codebooks
(TTQ), 2-entry codebooks or per-channel 1-bit grids (BWN), or k-bit grids (DoReFa), which it
entropy-codes. DoReFa's activation quantization (`bits_a`) is recorded for the runtime,
which applies it at inference (runtime.activation_quant). See docs/LOWBIT.md.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from packer.config import MethodConfig, Option, closed_interval
from packer.methods.base import CompressJob, Method, refuse_torchscript
from packer.methods.lowbit.layers import (
    EDGE_PRECISIONS,
    PRECISIONS,
    attach,
    attach_input_quantizer,
    detach,
    detach_input_quantizer,
    plan_precisions,
)
from packer.methods.lowbit.quantizers import (
    BinaryQuantizer,
    DoReFaQuantizer,
    Int8Quantizer,
    TernaryQuantizer,
    WeightQuantizer,
)
from packer.methods.pqf.method import PQFMethod
from packer.training import DataSpec, build_datasets, epochs_to_run, training_data
from packer.training.batchnorm import recalibrate_batchnorm
from packer.training.finetune import finetune
from runtime.errors import ConfigError
from runtime.format.features import ACTIVATION_QUANT
from runtime.format.records import ActivationQuantRecord
from runtime.tensors import CompressedTensor

DEFAULT_EPOCHS_WITH_DATA = 8



def _bits(what: str):
    return lambda v: (None if v is None or 1 <= v <= 8
                      else f"{what} must be between 1 and 8 bits, not {v}")


COMMON_OPTIONS: dict[str, Option] = {
    "epochs": Option(None, f"training epochs (default: {DEFAULT_EPOCHS_WITH_DATA} with "
                     "training data, 0 without; 0 = quantize only)", int,
                     check=closed_interval(0, 1000, "epochs"), per_layer=False),
    "lr": Option(1e-3, "peak learning rate; cosine decay to lr_min, stepped per batch "
                 "(1e-3: best held-out top-1 of 2e-4, 5e-4, 1e-3 for ttq and bwn)", float,
                 check=closed_interval(1e-9, 10.0, "lr"), per_layer=False),
    "lr_min": replace(PQFMethod.options["lr_min"], default=0.0),
    "optimizer": Option("adam", "adam, or sgd (momentum 0.9)", str, choices=("adam", "sgd"),
                        per_layer=False),
    "weight_decay": Option(0.0, "weight decay on every trained parameter", float,
                           check=closed_interval(0.0, 1.0, "weight_decay"), per_layer=False),
    "distill": Option(True, "train against the uncompressed model's outputs (knowledge "
                      "distillation, temperature distill_temperature) instead of the labels",
                      bool, per_layer=False),
    "distill_temperature": Option(4.0, "softmax temperature of the distillation loss", float,
                                  check=closed_interval(0.05, 100.0, "distill_temperature"),
                                  per_layer=False),
    "bn_recalibration": Option(2048, "training images to re-estimate BatchNorm statistics on "
                             "after quantizing, before training (0: off)", int,
                             check=closed_interval(0, 10**9, "bn_recalibration"), per_layer=False),
    **{k: PQFMethod.options[k] for k in ("train_limit", "val_limit", "holdout")},
    "checkpoint": Option(None, "training checkpoint file: written every epoch, resumed from "
                         "if present", str, per_layer=False),
    "edges": Option("int8", "precision of the first and last Conv/Linear layer: int8, fp32 "
                    "(kept, still trained) or low (the method's own grid)", str,
                    choices=EDGE_PRECISIONS, per_layer=False),
    "precision": Option("auto", "per layer: auto (first/last layer: `edges`, others: low), "
                        "low, int8 or fp32", str, choices=PRECISIONS),
}


class LowBitMethod(Method):
    """What the three methods share; subclasses choose the low-bit quantizer."""

    trains = True
    method_options: ClassVar[dict[str, Option]] = {}

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def low_quantizer(self, latent: torch.Tensor, opts: dict[str, Any]) -> WeightQuantizer:
        raise NotImplementedError

    def activation_bits(self, opts: dict[str, Any]) -> int | None:
        """Bits of a low-bit layer's input activations (None: not quantized)."""
        return None

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        return dict(self.report)

    # --- steps -----------------------------------------------------------------------------

    def _check(self, job: CompressJob) -> tuple[int, DataSpec | None]:
        refuse_torchscript(job.model, self.name, "trains the model's layers")
        data = training_data(job.data, self.name)
        return epochs_to_run(job.config.options["epochs"], data, self.name, "epochs",
                             DEFAULT_EPOCHS_WITH_DATA, "quantize only"), data

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        epochs, data = self._check(job)
        opts = job.config.options
        model = job.model
        plan, notes = plan_precisions(model, job.targets, job.config.for_tensor)
        if not any(p == "low" for p in plan.values()):
            raise ConfigError(f"{self.name}: no layer is left to quantize at low precision "
                              f"(precisions: {plan or 'no Conv/Linear layer'})")
        teacher = (copy.deepcopy(model).eval() if opts["distill"] and epochs > 0 else None)
        activations: list[ActivationQuantRecord] = []
        for name, precision in plan.items():
            module = model.get_submodule(name)
            lopts = job.config.for_tensor(f"{name}.weight")
            if precision == "low":
                attach(module, self.low_quantizer(module.weight, lopts))
                bits = self.activation_bits(lopts)
                if bits is not None:
                    clip = float(lopts["act_clip"])
                    attach_input_quantizer(module, bits, clip)
                    activations.append(ActivationQuantRecord(name, bits, clip))
            elif precision == "int8":
                attach(module, Int8Quantizer())
        self.report = {f"{self.name}_plan": plan, f"{self.name}_notes": notes}

        train_set, val_set = (build_datasets(data, opts["holdout"], job.seed)
                              if data is not None else (None, None))
        if train_set is not None and opts["bn_recalibration"] > 0:
            recalibrate_batchnorm(model, train_set, opts["bn_recalibration"], data.batch_size,
                           data.workers, job.seed)
            self.report[f"{self.name}_bn_recalibrated_on"] = opts["bn_recalibration"]
        if epochs > 0:
            self.report[f"{self.name}_training"] = self._train(job, epochs, data, train_set,
                                                               val_set, teacher)

        out: dict[str, CompressedTensor] = {}
        layers: dict[str, Any] = {}
        for name, precision in plan.items():
            module = model.get_submodule(name)
            if precision == "fp32":
                continue
            stats = module.weight_quantizer.stats(module.latent_weight)
            kind = module.weight_quantizer.kind
            out[f"{name}.weight"] = detach(module)
            detach_input_quantizer(module)
            layers[name] = {"precision": precision, "form": kind, **stats}
        self.report[f"{self.name}_layers"] = layers
        self.report["lowbit_weights"] = sorted(f"{n}.weight" for n, p in plan.items()
                                               if p == "low")
        job.activation_quant[:] = activations
        model.cpu().eval()
        # The packer stores everything not returned here from job.state_dict: give it the
        # trained values (BatchNorm, biases, layers kept at fp32).
        final = model.state_dict()
        for key in job.state_dict:
            job.state_dict[key] = final[key].detach().clone()
        return out

    def _train(self, job: CompressJob, epochs: int, data: DataSpec, train_set: Any,
               val_set: Any, teacher: nn.Module | None) -> dict[str, Any]:
        opts = job.config.options
        report = finetune(job, epochs, data, train_set, val_set, teacher,
                          weight_decay=opts["weight_decay"], optimizer=opts["optimizer"])
        return {**report,
                "schedule": f"{opts['optimizer']}, lr {opts['lr']:g} cosine to "
                            f"{opts['lr_min']:g} per batch over {epochs} epochs"}


class TTQMethod(LowBitMethod):
    name = "ttq"
    summary = "trained ternary quantization: {-W_n, 0, +W_p} per layer, trained scales (TTQ)"
    options = {
        "threshold": Option(0.05, "t: weights within t * max|w| of zero become 0", float,
                            check=closed_interval(0.0, 0.99, "threshold")),
        **COMMON_OPTIONS,
    }

    def low_quantizer(self, latent: torch.Tensor, opts: dict[str, Any]) -> WeightQuantizer:
        return TernaryQuantizer(latent, opts["threshold"])


class BWNMethod(LowBitMethod):
    name = "bwn"
    summary = "binary weights alpha * sign(w), alpha per layer or per output channel (BWN)"
    options = {
        "granularity": Option("layer", "alpha per layer (BWN) or per output channel (BWN-F)",
                              str, choices=("layer", "channel")),
        **COMMON_OPTIONS,
    }

    def low_quantizer(self, latent: torch.Tensor, opts: dict[str, Any]) -> WeightQuantizer:
        # fp16=true also stores BWN-F's per-channel scales at float16 (feature half_scales).
        return BinaryQuantizer(per_channel=opts["granularity"] == "channel", clip_grad=True,
                               half_scales=opts["fp16"])


class DoReFaMethod(LowBitMethod):
    name = "dorefa"
    summary = "DoReFa k-bit weights (tanh normalisation), optional k-bit activations"
    options = {
        "bits_w": Option(4, "weight bits, 1-8 (1: sign * mean|w|)", int, check=_bits("bits_w")),
        "bits_a": Option(None, "activation bits, 1-8, of every low-bit layer's input, clipped "
                         "to [0, act_clip] and applied by the runtime (default: none)", int,
                         check=_bits("bits_a")),
        "act_clip": Option(1.0, "upper clip of quantized activations (the paper's 1.0)", float,
                           check=closed_interval(1e-6, 1e6, "act_clip")),
        **COMMON_OPTIONS,
    }

    def low_quantizer(self, latent: torch.Tensor, opts: dict[str, Any]) -> WeightQuantizer:
        bits = int(opts["bits_w"])
        if bits == 1:
            return BinaryQuantizer(per_channel=False, clip_grad=False)
        return DoReFaQuantizer(bits)

    def activation_bits(self, opts: dict[str, Any]) -> int | None:
        return opts["bits_a"]

    def required_features(self, config: MethodConfig) -> frozenset[str]:
        wanted = config.options.get("bits_a") is not None or any(
            v.get("bits_a") is not None for _, v in config.layers)
        return frozenset({ACTIVATION_QUANT}) if wanted else frozenset()
