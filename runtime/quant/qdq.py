"""The int8 QDQ ONNX graph (the form TensorRT and onnxruntime consume), from the torch
fake-quant module.

Exporting the fake-quant module (`runtime.quant.fakequant`) gives QuantizeLinear ->
DequantizeLinear pairs exactly where torch quantizes, so the two backends cannot drift
apart. The export is then lowered to the usual QDQ form:
* activation scales and zero points become initializers (`<label>.scale`, int8 zero point 0);
* every Conv / Gemm weight (and a MatMul weight read through Transpose) becomes an int8
  initializer -> DequantizeLinear(axis=0, zero point 0), one scale per output channel, with
  BatchNorm already folded in;
* every Conv / Gemm bias becomes int32 -> DequantizeLinear(axis=0), scale input scale x
  weight scale, which is what lets onnxruntime fuse DQ -> Conv -> Q into QLinearConv.

ONNX nodes are matched to torch modules through the weight input's name: the TorchScript
exporter keeps state_dict names ("layer1.0.conv1.weight") for parameters. The saliency
predictors of channel gates (runtime.gating, a Gemm each) stay float, as in torch: they
read the int8 grid's dequantized values, so both backends keep the same channels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from runtime.gating import ChannelGate
from runtime.onnx.graph import export_module
from runtime.quant.errors import QuantError
from runtime.quant.fakequant import fake_quant_plan
from runtime.quant.layers import QuantizedLayer
from runtime.quant.weights import Int8Weight

__all__ = ["MAX_IR_VERSION", "OPSET", "export_fp32", "graph_types", "to_qdq"]

OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
_WEIGHT_SUFFIX = ".weight"
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SCOPE = re.compile(r"/(act_quant_\d+)/")


def export_fp32(module: nn.Module, input_shape: Sequence[int]) -> onnx.ModelProto:
    """fp32 ONNX graph of `module`: the ONNX backend's export (BatchNorm a separate node,
    which onnxruntime folds itself); the baseline the int8 graph is measured against."""
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


def _constant(name: str, producers: dict[str, onnx.NodeProto],
              inits: dict[str, np.ndarray]) -> np.ndarray:
    """Value of a Constant (through Cast / Identity) or initializer the exporter made."""
    if name in inits:
        return inits[name]
    node = producers.get(name)
    if node is None:
        raise QuantError(f"quantization parameter {name!r} is not a constant")
    if node.op_type == "Constant" and len(node.attribute) == 1:
        value = helper.get_attribute_value(node.attribute[0])
        return (numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto)
                else np.asarray(value))
    if node.op_type == "Identity":
        return _constant(node.input[0], producers, inits)
    if node.op_type == "Cast":
        dtype = helper.tensor_dtype_to_np_dtype(_attr(node, "to", 0))
        return _constant(node.input[0], producers, inits).astype(dtype)
    raise QuantError(f"quantization parameter {name!r} comes from a {node.op_type} node")


class _Lowering:
    """Collects the initializers and nodes that replace the exporter's float ones."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producers = {o: n for n in graph.node for o in n.output}
        self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.new: dict[str, onnx.TensorProto] = {}

    def add(self, name: str, value: np.ndarray) -> str:
        if name not in self.new:
            self.new[name] = numpy_helper.from_array(value, name)
        return name

    def qdq_params(self, node: onnx.NodeProto, labels: Mapping[str, str]) -> None:
        """Scale and zero point of an activation Q/DQ as named initializers."""
        scale = _constant(node.input[1], self.producers, self.inits).astype(np.float32)
        zero = _constant(node.input[2], self.producers, self.inits)
        if scale.shape != () or zero.dtype != np.int8 or zero.any():
            raise QuantError(f"{node.name}: not a per-tensor int8 zero-point-0 quantizer")
        found = _SCOPE.search(node.name)
        label = labels.get(found.group(1), "") if found else ""
        base = label or node.output[0]
        node.input[1] = self.add(f"{base}.scale", scale)
        node.input[2] = self.add(f"{base}.zero_point", np.array(0, np.int8))

    def weight(self, name: str, w: Int8Weight) -> list[onnx.NodeProto]:
        channels = w.scales.size
        inputs = [self.add(f"{name}.weight_int8", w.q.astype(np.int8)),
                  self.add(f"{name}.weight_scale", w.scales.astype(np.float32)),
                  self.add(f"{name}.weight_zero_point", np.zeros(channels, np.int8))]
        return [helper.make_node("DequantizeLinear", inputs, [f"{name}.weight_dequantized"],
                                 name=f"{name}/weight/DequantizeLinear", axis=0)]

    def bias(self, name: str, q: QuantizedLayer) -> list[onnx.NodeProto]:
        assert q.bias is not None and q.bias_scale is not None
        inputs = [self.add(f"{name}.bias_int32", q.bias.astype(np.int32)),
                  self.add(f"{name}.bias_scale", q.bias_scale.astype(np.float32))]
        return [helper.make_node("DequantizeLinear", inputs, [f"{name}.bias_dequantized"],
                                 name=f"{name}/bias/DequantizeLinear", axis=0)]


def _lower(model: onnx.ModelProto, layers: Mapping[str, QuantizedLayer],
           labels: Mapping[str, str], float_layers: frozenset[str] = frozenset()) -> None:
    graph = model.graph
    low = _Lowering(graph)
    done: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in _QDQ:
            low.qdq_params(node, labels)
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            nodes.append(node)
            continue
        name, transposed = _layer_of(node.input[1], low.producers)
        if name in float_layers or node.op_type == "MatMul" and name not in layers:
            nodes.append(node)  # activation x activation: stays float
            continue
        if name not in layers or name in done:
            raise QuantError(f"cannot tell which layer ONNX node {node.name or node.op_type} "
                             f"belongs to (weight input {node.input[1]!r})")
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or
                                       _attr(node, "transA", 0) != 0):
            raise QuantError(f"Gemm of {name} is not x @ W^T; cannot quantize per out channel")
        q = layers[name]
        nodes += low.weight(name, q.weight)
        weight_out = nodes[-1].output[0]
        if transposed:
            original = low.producers[node.input[1]]
            nodes.append(helper.make_node("Transpose", [weight_out], [f"{name}.weight_t"],
                                          name=f"{name}/weight/Transpose"))
            nodes[-1].attribute.extend(original.attribute)  # same perm
            weight_out = f"{name}.weight_t"
        node.input[1] = weight_out
        if len(node.input) > 2 and node.input[2] and q.bias is not None:
            nodes += low.bias(name, q)
            node.input[2] = nodes[-1].output[0]
        nodes.append(node)
        done.add(name)
    missing = sorted(set(layers) - done)
    if missing:
        raise QuantError(f"layer(s) not found in the ONNX graph: {', '.join(missing[:5])}")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(low.new.values())


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


def to_qdq(module: nn.Module, input_shape: Sequence[int], act_scales: Mapping[str, float],
           weights: Mapping[str, Int8Weight]) -> onnx.ModelProto:
    """The int8 QDQ graph of `module` (one sample's `input_shape`, C, H, W) with its int8
    weights and the activation scales of every label of its plan."""
    plan, layers, labels = fake_quant_plan(module, act_scales, weights)
    model = export_module(plan.graph, tuple(input_shape))
    gates = frozenset(n for n, m in plan.graph.named_modules() if isinstance(m, ChannelGate))
    _lower(model, layers, labels, gates)
    _prune(model.graph)
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
