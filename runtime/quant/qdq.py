"""Rewrite an fp32 ONNX graph into an int8 QDQ graph (the form TensorRT and ORT consume).

Every Conv / Gemm, and every MatMul whose second input is a layer weight, gets
* its weight as an int8 initializer -> DequantizeLinear(axis=0, zero point 0), one scale per
  output channel (the torch [out, in, ...] layout: axis 0 for Conv and for Gemm transB=1);
* its activation input wrapped in QuantizeLinear -> DequantizeLinear with the layer's
  calibrated per-tensor scale (zero point 0, int8).

ONNX nodes are matched to torch modules through the weight input's name: the TorchScript
exporter keeps state_dict names ("layer1.0.conv1.weight") for parameters, also when it
deduplicates equal tensors behind Identity nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from runtime.onnx.graph import export_module
from runtime.quant.calibrate import QUANTIZED_TYPES, check_scales
from runtime.quant.errors import QuantError
from runtime.quant.weights import Int8Weight

__all__ = ["MAX_IR_VERSION", "OPSET", "export_fp32", "graph_types", "to_qdq"]

OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
_WEIGHT_SUFFIX = ".weight"


def export_fp32(module: nn.Module, input_shape: Sequence[int]) -> onnx.ModelProto:
    """fp32 ONNX graph of `module`: the ONNX backend's export (no folding, so weights keep
    their state_dict names and BatchNorm stays a separate node)."""
    return export_module(module, tuple(input_shape))


def _layer_of(weight_input: str, producers: dict[str, onnx.NodeProto]) -> tuple[str, bool]:
    """(module name, through_transpose) for a weight input name, following one Transpose
    (a Linear exported as MatMul reads Transpose(weight))."""
    node = producers.get(weight_input)
    if node is not None and node.op_type == "Transpose":
        return _layer_of(node.input[0], producers)[0], True
    if weight_input.endswith(_WEIGHT_SUFFIX):
        return weight_input[: -len(_WEIGHT_SUFFIX)], False
    return "", False


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info no longer reachable from the outputs."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def to_qdq(fp32: onnx.ModelProto, module: nn.Module, act_scales: Mapping[str, float],
           weights: Mapping[str, Int8Weight]) -> onnx.ModelProto:
    """A QDQ copy of `fp32` (exported from `module`) with int8 weights and activations."""
    check_scales(act_scales)
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    layers = {n for n, m in module.named_modules() if isinstance(m, QUANTIZED_TYPES)}
    done: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            nodes.append(node)
            continue
        name, transposed = _layer_of(node.input[1], producers)
        if node.op_type == "MatMul" and name not in layers:
            nodes.append(node)  # activation x activation: stays float
            continue
        if name not in layers:
            raise QuantError(f"cannot tell which layer ONNX node {node.name or node.op_type} "
                             f"belongs to (weight input {node.input[1]!r})")
        if name not in act_scales or name not in weights:
            raise QuantError(f"no activation scale or int8 weight for layer {name}")
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or
                                       _attr(node, "transA", 0) != 0):
            raise QuantError(f"Gemm of {name} is not x @ W^T; cannot quantize per out channel")
        tag = f"{name}.{len(done)}" if name in done else name  # a layer called twice
        w = weights[name]
        channels = w.scales.size
        new_inits += [
            numpy_helper.from_array(w.q.astype(np.int8), f"{tag}.weight_int8"),
            numpy_helper.from_array(w.scales.astype(np.float32), f"{tag}.weight_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int8), f"{tag}.weight_zero_point"),
            numpy_helper.from_array(np.array(act_scales[name], np.float32), f"{tag}.input_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{tag}.input_zero_point"),
        ]
        weight_out = f"{tag}.weight_dequantized"
        nodes.append(helper.make_node(
            "DequantizeLinear", [f"{tag}.weight_int8", f"{tag}.weight_scale",
                                 f"{tag}.weight_zero_point"], [weight_out],
            name=f"{tag}/weight/DequantizeLinear", axis=0))
        if transposed:
            original = producers[node.input[1]]
            nodes.append(helper.make_node("Transpose", [weight_out], [f"{tag}.weight_t"],
                                          name=f"{tag}/weight/Transpose"))
            nodes[-1].attribute.extend(original.attribute)  # same perm
            weight_out = f"{tag}.weight_t"
        act = node.input[0]
        nodes += [
            helper.make_node("QuantizeLinear", [act, f"{tag}.input_scale",
                                                f"{tag}.input_zero_point"],
                             [f"{tag}.input_int8"], name=f"{tag}/input/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tag}.input_int8", f"{tag}.input_scale",
                                                  f"{tag}.input_zero_point"],
                             [f"{tag}.input_dequantized"], name=f"{tag}/input/DequantizeLinear"),
        ]
        node.input[0] = f"{tag}.input_dequantized"
        node.input[1] = weight_out
        nodes.append(node)
        done.add(name)
    missing = sorted(layers - done)
    if missing:
        raise QuantError(f"layer(s) not found in the ONNX graph: {', '.join(missing[:5])}")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _prune(graph)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QuantError(f"the QDQ graph is not valid ONNX: {exc}") from exc
    return model


def graph_types(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type: a quick look at what a graph (or ORT's optimized one) holds."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
