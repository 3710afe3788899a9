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

from runtime.atomic import atomic_write
from runtime.decode import decode_tensor
from runtime.format.reader import open_packed
from runtime.loader import load
from runtime.onnx.session import CPU, OnnxSession, gpu_chain
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
    "export_int8",
    "fake_quant_module",
    "for_cpu",
    "graph_types",
    "int8_graph",
    "int8_model",
    "int8_session",
    "int8_weight",
    "load_int8",
    "qdq_model",
    "quantize_weights",
    "to_qdq",
]

BACKENDS = ("torch", "onnx")
TARGETS = ("onnxruntime", "tensorrt")
"""Forms of the exported int8 graph (`int8_graph`), by the server that runs it."""
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
    `device="cuda"` runs the graph of target "tensorrt" on TensorRT, else CUDA (else CPU,
    with one warning); `"cpu"` runs the graph of target "onnxruntime" (see `int8_graph`)."""
    if backend not in BACKENDS:
        raise QuantError(f"unknown int8 backend {backend!r}; choose from {', '.join(BACKENDS)}")
    pack = load_int8(path)
    scales = _scales(path, pack, act_scales)
    try:
        if backend == "torch":
            return fake_quant_module(pack.module, scales, pack.weights)
        if device == "cpu":
            return OnnxSession.from_graph(int8_graph(pack, scales, "onnxruntime"),
                                          providers=[CPU], threads=threads)
        return OnnxSession.from_graph(int8_graph(pack, scales, "tensorrt"), providers=None,
                                      threads=threads)
    except NoActivationScales as exc:
        raise NoActivationScales(f"{path}: {exc}") from None


def int8_session(path: str | os.PathLike[str], act_scales: Mapping[str, float] | None = None,
                 providers: list[str] | None = None, threads: int | None = None
                 ) -> OnnxSession:
    """`runtime.session(path, int8=True)`: the QDQ graph `runtime export --int8` writes, in
    the form for the provider that runs it (target "tensorrt" when a GPU provider is tried
    first, else "onnxruntime")."""
    pack = load_int8(path)
    scales = _scales(path, pack, act_scales)
    target = "tensorrt" if gpu_chain(providers) else "onnxruntime"
    try:
        graph = int8_graph(pack, scales, target)
    except NoActivationScales as exc:
        raise NoActivationScales(f"{path}: {exc}") from None
    return OnnxSession.from_graph(graph, providers=providers, threads=threads)


def _scales(path: str | os.PathLike[str], pack: Int8Pack,
            act_scales: Mapping[str, float] | None) -> dict[str, float]:
    scales = dict(act_scales) if act_scales is not None else pack.act_scales
    if not scales:
        raise NoActivationScales(
            f"{path}: has no activation scales; pack it with --calib-data DIR or pass "
            "act_scales from runtime.quant.calibrate()")
    return scales


def qdq_model(pack: Int8Pack, act_scales: Mapping[str, float]) -> onnx.ModelProto:
    """The QDQ ONNX graph of a loaded pack (the form of target "tensorrt")."""
    return to_qdq(pack.module, pack.input_shape, act_scales, pack.weights)


def int8_graph(pack: Int8Pack, act_scales: Mapping[str, float], target: str = "onnxruntime"
               ) -> onnx.ModelProto:
    """The QDQ graph in the form `target` runs fastest, the same values either way:

    * "tensorrt": int8 activations with zero point 0 and Q/DQ pairs where the fake-quant
      module quantizes (`to_qdq`): TensorRT supports only symmetric int8 and places its
      int8 kernels by these pairs.
    * "onnxruntime": that graph rewritten by `for_cpu` (uint8 activations with zero point 128,
      ReLU between DQ and Q as LeakyRelu(0)), which onnxruntime's CPU provider fuses into
      QLinearConv / QLinearAdd / QLinearLeakyRelu in a plain InferenceSession.

    The target is recorded in the model's metadata (`weightpack.int8_target`).
    """
    if target not in TARGETS:
        raise QuantError(f"unknown int8 target {target!r}; choose from {', '.join(TARGETS)}")
    graph = qdq_model(pack, act_scales)
    if target == "onnxruntime":
        graph = for_cpu(graph)
    entry = graph.metadata_props.add()
    entry.key, entry.value = "weightpack.int8_target", target
    return graph


def export_int8(path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                target: str | None = None) -> dict[str, Any]:
    """`runtime export --int8`: write the file's QDQ graph for `target` (default
    "onnxruntime") with its stored activation scales; returns a size report."""
    target = target or "onnxruntime"
    if target not in TARGETS:
        raise QuantError(f"unknown int8 target {target!r}; choose from {', '.join(TARGETS)}")
    pack = load_int8(path)
    if not pack.act_scales:
        raise NoActivationScales(f"{path}: has no activation scales; pack it with --calib-data "
                                 "DIR")
    try:
        model = int8_graph(pack, pack.act_scales, target)
    except NoActivationScales as exc:
        raise NoActivationScales(f"{path}: {exc}") from None
    written = atomic_write(out_path, [model.SerializeToString()])
    packed_bytes = os.path.getsize(path)
    return {"path": str(out_path), "onnx_bytes": written, "packed_bytes": packed_bytes,
            "onnx_to_packed": round(written / packed_bytes, 4), "int8": True, "target": target}


def calibration_json(method: str, images: int, percentile: float | None = None,
                     data: str = "") -> str:
    """Canonical JSON recording how activation scales were made (ModelRecord field)."""
    doc: dict[str, Any] = {"method": method, "images": images, "activations": "int8 symmetric "
                           "per-tensor, zero point 0", "tensors": TENSORS, "data": data}
    if method == "percentile":
        doc["percentile"] = percentile
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
