"""Builders of small hostile packed files, shared by the hostile-file tests and the fuzzer.

Each builder writes a file through the real writer (so its checksums and layout are valid)
whose content is an attack: only the loader's own checks stand between it and the harm.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime.format.records import ArchitectureRecord, InputSpec, ModelRecord
from runtime.onnx.graph import EXTERNAL_LOCATION, IR_VERSION, OPSET
from runtime.tensors import CompressedTensor, RawTensor

TINY_SPEC = InputSpec((1, 2, 2), (0.0,), (1.0,))


def external_tensor(name: str, location: str, n: int) -> onnx.TensorProto:
    """A float vector of `n` whose bytes onnxruntime would read from file `location`."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [n], [0.0] * n)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def graph_model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
                width: int = 4) -> onnx.ModelProto:
    """input [N, 1, 2, 2] (TINY_SPEC) -> x [N, 4] -> logits [N, width] over `nodes`."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["x"]), *nodes], "hostile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *TINY_SPEC.shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def sparse_leak_graph(secret: str, width: int = 4) -> onnx.ModelProto:
    """logits = x + w + If(true): a subgraph *sparse initializer* whose values are external
    data at the relative location `secret`, so the file's output would be that file's bytes."""
    values = external_tensor("leak_values", secret, width)
    values.external_data.add(key="length", value=str(4 * width))
    indices = helper.make_tensor("leak_indices", TensorProto.INT64, [width], list(range(width)))
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["leak_values"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [width])])
    then_graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [width]))
    zeros = helper.make_tensor("zeros", TensorProto.FLOAT, [width], [0.0] * width)
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["else_out"], value=zeros)], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [width])])
    true = helper.make_tensor("true", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("Constant", [], ["cond"], value=true),
             helper.make_node("If", ["cond"], ["leak"], then_branch=then_graph,
                              else_branch=else_graph),
             helper.make_node("Add", ["x", "leak"], ["sum"]),
             helper.make_node("Add", ["sum", "w"], ["logits"])]
    return graph_model(nodes, [external_tensor("w", EXTERNAL_LOCATION, width)], width)


def write_graph_file(path: Path, graph: onnx.ModelProto | bytes,
                     tensors: dict[str, CompressedTensor] | None = None,
                     coder: str = "raw") -> Path:
    """A packed file of architecture kind onnx_graph with `graph` and `tensors` (default: the
    4-wide zero vector `w` that `graph_model` graphs expect)."""
    tensors = tensors if tensors is not None else {"w": RawTensor(torch.zeros(4), torch.float32)}
    data = DataSection(64)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in tensors.items())
    blob = graph if isinstance(graph, bytes) else graph.SerializeToString()
    write_packed(path, ModelRecord(
        producer="weightpack test", method="none", method_config_json="{}",
        source_sha256="0" * 64, architecture=ArchitectureRecord("onnx_graph", graph=data.add(blob)),
        input=TINY_SPEC, num_classes=4, tensors=records, fp32_bytes=16), data)
    return path


def builder_file(path: Path, tensors: dict[str, CompressedTensor], builder: str = "cifar_resnet20",
                 kwargs_json: str = "{}", coder: str = "raw",
                 input_spec: InputSpec | None = None) -> Path:
    """A packed file of architecture kind builder (`builder`, `kwargs_json`) with `tensors`
    and `input_spec` (default: a CIFAR-sized one)."""
    data = DataSection(64)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in tensors.items())
    write_packed(path, ModelRecord(
        producer="weightpack test", method="none", method_config_json="{}",
        source_sha256="0" * 64, architecture=ArchitectureRecord("builder", builder, kwargs_json),
        input=input_spec or InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        num_classes=10,
        tensors=records, fp32_bytes=16), data)
    return path
