"""8-bit inference: int8 weights per output channel, calibrated int8 activations.

    from runtime.quant import int8_model
    model = int8_model("r20.fb")                     # torch fake-quant module
    model = int8_model("r20.fb", backend="onnx")     # onnxruntime QDQ session, same results

BatchNorm is folded into the convolutions; weights are int8 per output channel, biases int32,
and activations int8 per tensor at every layer input, every convolution output and around
every residual add (`plan`), so onnxruntime runs QLinearConv / QLinearAdd. Activation scales
come from the packed file (`ModelRecord.activation_scales`, written by `packer compress
--calib-data`) or are passed in (`calibrate()` makes them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from torch import nn

from runtime.decode import decode_tensor
from runtime.format.reader import open_packed
from runtime.loader import load
from runtime.onnx.session import OnnxSession
from runtime.quant.calibrate import METHODS, calibrate
from runtime.quant.errors import CalibrationError, NoActivationScales, QuantError
from runtime.quant.fakequant import FakeQuant, fake_quant_module
from runtime.quant.ort import cpu_session, for_cpu
from runtime.quant.plan import QUANTIZED_TYPES, QuantPlan, build_plan
from runtime.quant.qdq import export_fp32, graph_types, to_qdq
from runtime.quant.weights import Int8Weight, int8_weight

__all__ = [
    "METHODS",
    "CalibrationError",
    "FakeQuant",
    "Int8Pack",
    "Int8Weight",
    "NoActivationScales",
    "OnnxSession",
    "QuantError",
    "QuantPlan",
    "build_plan",
    "calibrate",
    "calibration_json",
    "cpu_session",
    "export_fp32",
    "fake_quant_module",
    "for_cpu",
    "graph_types",
    "int8_model",
    "int8_weight",
    "load_int8",
    "qdq_model",
    "quantize_weights",
    "to_qdq",
]

BACKENDS = ("torch", "onnx")
TENSORS = "layer inputs, conv outputs (BatchNorm folded), residual add inputs and outputs"


@dataclass
class Int8Pack:
    """What int8 inference needs from one packed file."""

    module: nn.Module  # the fp32 decoded model, eval mode
    weights: dict[str, Int8Weight]  # per Conv2d/Linear module name (BatchNorm not folded)
    act_scales: dict[str, float] | None  # from the file, None when it has none
    input_shape: tuple[int, ...]  # (C, H, W)

    def exact_layers(self) -> dict[str, bool]:
        """Per layer: True when int8 adds no error to the decoded weight."""
        return {name: w.exact for name, w in self.weights.items()}


def quantize_weights(module: nn.Module, compressed: Mapping[str, Any] | None = None
                     ) -> dict[str, Int8Weight]:
    """Int8 weights of every Conv2d/Linear of `module`; `compressed` (state_dict name ->
    CompressedTensor) enables exact-grid detection."""
    compressed = compressed or {}
    return {name: int8_weight(m.weight, compressed.get(f"{name}.weight"))
            for name, m in module.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def load_int8(path: str | os.PathLike[str]) -> Int8Pack:
    """Decode a packed file and quantize its Conv/Linear weights to int8."""
    module = load(path)
    names = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, QUANTIZED_TYPES)}
    with open_packed(path) as packed:
        model = packed.model
        compressed = {r.name: decode_tensor(packed, r) for r in model.tensors if r.name in names}
        scales = dict(model.activation_scales) or None
        shape = tuple(model.input.shape)
    return Int8Pack(module, quantize_weights(module, compressed), scales, shape)


def int8_model(path: str | os.PathLike[str], act_scales: Mapping[str, float] | None = None,
               backend: str = "torch", threads: int | None = None,
               device: str = "cpu") -> nn.Module | OnnxSession:
    """The packed model with int8 weights and activations, as a torch fake-quant module
    (`backend="torch"`) or an onnxruntime session over the QDQ graph (`"onnx"`), both
    built from one plan: onnxruntime computes in integers what torch simulates in float32.
    `act_scales` overrides the file's calibrated scales. With `backend="onnx"`,
    `device="cuda"` runs the plain QDQ graph on TensorRT, else CUDA (else CPU, with one
    warning); `"cpu"` runs the CPU-tuned rewrite of it."""
    if backend not in BACKENDS:
        raise QuantError(f"unknown int8 backend {backend!r}; choose from {', '.join(BACKENDS)}")
    pack = load_int8(path)
    scales = dict(act_scales) if act_scales is not None else pack.act_scales
    if not scales:
        raise NoActivationScales(
            f"{path}: has no activation scales; pack it with --calib-data DIR or pass "
            "act_scales from runtime.quant.calibrate()")
    try:
        if backend == "torch":
            return fake_quant_module(pack.module, scales, pack.weights)
        graph = qdq_model(pack, scales)
        if device == "cpu":
            return cpu_session(graph, threads=threads)
        return OnnxSession.from_graph(graph, providers=None, threads=threads)
    except NoActivationScales as exc:
        raise NoActivationScales(f"{path}: {exc}") from None


def qdq_model(pack: Int8Pack, act_scales: Mapping[str, float]) -> onnx.ModelProto:
    """The QDQ ONNX graph of a loaded pack."""
    return to_qdq(pack.module, pack.input_shape, act_scales, pack.weights)


def calibration_json(method: str, images: int, percentile: float | None = None,
                     data: str = "") -> str:
    """Canonical JSON recording how activation scales were made (ModelRecord field)."""
    doc: dict[str, Any] = {"method": method, "images": images, "activations": "int8 symmetric "
                           "per-tensor, zero point 0", "tensors": TENSORS, "data": data}
    if method == "percentile":
        doc["percentile"] = percentile
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
