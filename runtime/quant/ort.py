"""The QDQ graph on onnxruntime's CPU provider, in the form its integer kernels run fastest.

Two rewrites, each computing exactly what the int8 graph computes:
* activations int8 with zero point 0 -> uint8 with zero point 128 (q + 128, same scale).
  x86 integer kernels multiply uint8 activations by int8 weights; onnxruntime makes this
  change itself (QDQS8ToU8Transformer), but only for a QuantizeLinear with one consumer, so a
  tensor that feeds both a convolution and a residual add would stay int8 and break fusion.
* a Relu between DequantizeLinear and QuantizeLinear -> LeakyRelu(alpha=0), which onnxruntime
  fuses into QLinearLeakyRelu, a 256-entry lookup table on the uint8 codes; a Relu would run
  in float32 between them (there is no integer Relu for a zero point other than the minimum).
`runtime export --int8` writes this form by default (`--target onnxruntime`); `--target
tensorrt` writes the graph before it: int8 with zero point 0, as TensorRT wants.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.onnx.session import CPU, OnnxSession

__all__ = ["cpu_session", "for_cpu"]


def _to_uint8(graph: onnx.GraphProto) -> None:
    inits = {t.name: t for t in graph.initializer}
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    converted: dict[str, str] = {}
    for node in graph.node:
        activation = node.op_type == "QuantizeLinear" or (
            node.op_type == "DequantizeLinear" and node.input[0] in quantized)
        if not activation or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zp = node.input[2]
        if zp not in converted:
            value = numpy_helper.to_array(inits[zp])
            if value.dtype != np.int8:
                continue
            converted[zp] = f"{zp}.uint8"
            shifted = (value.astype(np.int16) + 128).astype(np.uint8)
            graph.initializer.append(numpy_helper.from_array(shifted, converted[zp]))
        node.input[2] = converted[zp]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """The int8 zero points `_to_uint8` replaced (onnxruntime warns of each one it finds)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _relu_to_table(graph: onnx.GraphProto) -> None:
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type != "Relu" or node.output[0] in outputs:
            continue
        source = producers.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if (source is not None and source.op_type == "DequantizeLinear" and users
                and all(u.op_type == "QuantizeLinear" for u in users)):
            node.op_type = "LeakyRelu"
            node.attribute.append(helper.make_attribute("alpha", 0.0))


def for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ graph rewritten for onnxruntime's CPU kernels (same results)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _to_uint8(out.graph)
    _relu_to_table(out.graph)
    _drop_unused_initializers(out.graph)
    return out


def cpu_session(model: onnx.ModelProto, threads: int | None = None,
                optimized_path: str | os.PathLike | None = None) -> OnnxSession:
    """An onnxruntime CPU session over `model` (QDQ graphs rewritten by `for_cpu`; an fp32
    graph is unchanged); `optimized_path` saves the graph onnxruntime actually runs."""
    return OnnxSession.from_graph(for_cpu(model), providers=[CPU], threads=threads,
                                  optimized_model_path=optimized_path)
