"""Export a packed file as one .onnx file: fp32 weights inline, or compact.

Compact graphs keep the packed file's quantized form: uint8/uint16 indices (or int8/int16
codes) plus small float codebooks or scales, and rebuild each weight with a few constant
nodes (Cast, Gather, Reshape, Sub, Mul). onnxruntime constant-folds those at session start,
so inference runs on plain fp32 weights equal to the standalone export's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from runtime.atomic import atomic_write, check_output
from runtime.decode import decode_tensor
from runtime.errors import WeightpackError
from runtime.format.reader import PackedFile, open_packed
from runtime.onnx.graph import (
    WeightSpec,
    check_weights,
    external_weights,
    fill_weights,
    graph_and_weights,
)
from runtime.onnx.session import CPU, make_session
from runtime.tensors import (
    CompressedTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

SEP = "::"  # suffix separator for the helper tensors of a rebuilt weight ("w::indices")
NODE_OVERHEAD = 256  # rough protobuf bytes of a rebuilt weight's nodes and names
_QUANTIZED = (ScalarCodebookTensor, VectorCodebookTensor, UniformTensor)
_FLOAT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
_VERIFY_BATCH = 8


def export_onnx(packed_path: str | os.PathLike, out_path: str | os.PathLike,
                compact: bool = False, verify: bool = True) -> dict[str, Any]:
    """Write the packed file's model as a standalone ONNX file; returns a size report.

    Report: onnx_bytes, packed_bytes, onnx_to_packed (onnx / packed), compact, folded (no
    dequantization subgraph survives onnxruntime's optimiser; trivially true when not
    compact), rebuilt (weights rebuilt in-graph), and with `verify` on a compact export
    max_abs_diff / exact: its outputs against the standalone graph's on onnxruntime CPU
    (this writes onnxruntime's optimised graph to a temporary folder, deleted at once).
    """
    check_output(out_path, example="model.onnx")
    with open_packed(packed_path) as packed:
        packed_bytes = packed.size
        input_shape = packed.model.input.shape
        graph, weights = graph_and_weights(packed)
        compressed = _compressed(packed, set(weights)) if compact else {}
    report: dict[str, Any] = {"compact": compact, "folded": True, "rebuilt": 0}
    if compact:
        reference = None
        if verify:
            reference, _ = make_session(graph, weights, [CPU])
        model, rebuilt = compact_graph(graph, weights, compressed)
        report["rebuilt"] = len(rebuilt)
        if verify:
            report.update(_verify_compact(model, rebuilt, reference, input_shape))
    else:
        model = fill_weights(graph, weights)
    try:
        onnx.checker.check_model(model)
        data = model.SerializeToString()
    except ValueError:
        raise WeightpackError("the ONNX model is over protobuf's 2 GiB limit; "
                              "try compact=True") from None
    written = atomic_write(out_path, [data])
    report.update(path=str(out_path), onnx_bytes=written, packed_bytes=packed_bytes,
                  onnx_to_packed=round(written / packed_bytes, 4))
    return report


def _compressed(packed: PackedFile, names: set[str]) -> dict[str, CompressedTensor]:
    """The file's quantized tensors among `names`, in compressed form."""
    return {t.name: decode_tensor(packed, t) for t in packed.model.tensors
            if t.name in names and t.scheme != "raw"}


# --- compact graph -----------------------------------------------------------------------------


def compact_graph(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                  compressed: dict[str, CompressedTensor]) -> tuple[onnx.ModelProto, list[str]]:
    """Fill the weight-free `model` (in place): quantized weights rebuilt in-graph, others inline.

    A weight is rebuilt only when that is smaller than storing it as fp32. Returns the model
    and the names of the rebuilt weights.
    """
    specs = external_weights(model)
    check_weights(specs, weights)
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    rebuilt: list[str] = []
    for tensor in graph.initializer:
        name = tensor.name
        spec = specs.get(name)
        parts = None
        if spec is not None and name in compressed:
            parts = _dequantize_nodes(name, compressed[name], spec)
        if parts is not None and any(t.name in taken for t in parts[0]):
            raise WeightpackError(f"graph already uses a name of the form {name}{SEP}...")
        if parts is not None:
            initializers += parts[0]
            nodes += parts[1]
            rebuilt.append(name)
        elif spec is not None:
            initializers.append(numpy_helper.from_array(weights[name], name))
        else:
            kept = TensorProto()
            kept.CopyFrom(tensor)
            initializers.append(kept)
    nodes += [_copy(n) for n in graph.node]  # rebuilt weights first: topological order
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    return model, rebuilt


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _dequantize_nodes(name: str, tensor: CompressedTensor, spec: WeightSpec
                      ) -> tuple[list[TensorProto], list[onnx.NodeProto]] | None:
    """Initializers and nodes that compute `name` exactly as tensor.dequantize() does.

    None when the weight is better stored inline (no saving, or a form not handled here).
    """
    if not isinstance(tensor, _QUANTIZED) or spec.dtype not in _FLOAT_TYPES:
        return None
    if tuple(tensor.shape) != spec.shape:
        return None
    if isinstance(tensor, UniformTensor):
        parts = _uniform(name, tensor, spec)
    else:
        parts = _codebook(name, tensor, spec)
    if parts is None:
        return None
    stored = sum(_nbytes(t) for t in parts[0]) + NODE_OVERHEAD
    return parts if stored < int(np.prod(spec.shape)) * spec.dtype.itemsize else None


def _codebook(name: str, tensor: ScalarCodebookTensor | VectorCodebookTensor, spec: WeightSpec
              ) -> tuple[list[TensorProto], list[onnx.NodeProto]] | None:
    if tensor.codebook.dtype not in (torch.float32, torch.float16):
        return None
    codebook = tensor.codebook.detach().cpu().numpy()
    k = codebook.shape[0]
    index_dtype = np.uint8 if k <= 256 else np.uint16
    indices = tensor.indices.detach().cpu().numpy()
    if isinstance(tensor, ScalarCodebookTensor):
        indices = indices.reshape(spec.shape)  # Gather then yields the weight's shape
    else:
        indices = indices.reshape(-1)
    inits = [numpy_helper.from_array(indices.astype(index_dtype), f"{name}{SEP}indices"),
             numpy_helper.from_array(np.ascontiguousarray(codebook), f"{name}{SEP}codebook")]
    nodes = [helper.make_node("Cast", [f"{name}{SEP}indices"], [f"{name}{SEP}indices_i32"],
                              name=f"{name}{SEP}cast_indices", to=TensorProto.INT32)]
    table = f"{name}{SEP}codebook"
    if codebook.dtype != np.float32:  # dequantize() gathers from codebook.float()
        nodes.append(helper.make_node("Cast", [table], [f"{table}_f32"],
                                      name=f"{name}{SEP}cast_codebook", to=TensorProto.FLOAT))
        table = f"{table}_f32"
    out, tail = _output(name, spec)
    if isinstance(tensor, ScalarCodebookTensor):
        nodes.append(helper.make_node("Gather", [table, f"{name}{SEP}indices_i32"], [out],
                                      name=f"{name}{SEP}gather", axis=0))
    else:
        inits.append(numpy_helper.from_array(np.array(spec.shape, dtype=np.int64),
                                             f"{name}{SEP}shape"))
        nodes += [helper.make_node("Gather", [table, f"{name}{SEP}indices_i32"],
                                   [f"{name}{SEP}rows"], name=f"{name}{SEP}gather", axis=0),
                  helper.make_node("Reshape", [f"{name}{SEP}rows", f"{name}{SEP}shape"], [out],
                                   name=f"{name}{SEP}reshape")]
    return inits, nodes + tail


def _uniform(name: str, tensor: UniformTensor, spec: WeightSpec
             ) -> tuple[list[TensorProto], list[onnx.NodeProto]] | None:
    codes = tensor.codes.detach().cpu().numpy().astype(np.int64)
    zero_points = (None if tensor.zero_points is None
                   else tensor.zero_points.detach().cpu().numpy().astype(np.int64))
    limit = 1 << 24  # integers exact in float32, so float subtraction equals int subtraction
    if codes.size == 0 or np.abs(codes).max() >= limit or (
            zero_points is not None and np.abs(zero_points).max() >= limit):
        return None
    store = _narrowest(int(codes.min()), int(codes.max()))
    view = [1] * len(spec.shape)
    if tensor.axis is not None:
        view[tensor.axis] = -1
    broadcast = tuple(view) if tensor.axis is not None else ()
    scales = tensor.scales.detach().cpu().numpy().astype(np.float32).reshape(broadcast)
    inits = [numpy_helper.from_array(codes.astype(store), f"{name}{SEP}codes"),
             numpy_helper.from_array(scales, f"{name}{SEP}scales")]
    nodes = [helper.make_node("Cast", [f"{name}{SEP}codes"], [f"{name}{SEP}codes_f32"],
                              name=f"{name}{SEP}cast_codes", to=TensorProto.FLOAT)]
    centred = f"{name}{SEP}codes_f32"
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points.astype(np.float32).reshape(broadcast),
                                             f"{name}{SEP}zero_points"))
        nodes.append(helper.make_node("Sub", [centred, f"{name}{SEP}zero_points"],
                                      [f"{name}{SEP}centred"], name=f"{name}{SEP}sub"))
        centred = f"{name}{SEP}centred"
    out, tail = _output(name, spec)
    nodes.append(helper.make_node("Mul", [centred, f"{name}{SEP}scales"], [out],
                                  name=f"{name}{SEP}mul"))
    return inits, nodes + tail


def _output(name: str, spec: WeightSpec) -> tuple[str, list[onnx.NodeProto]]:
    """Where the fp32 result goes, plus a final Cast when the graph wants another float type."""
    if spec.dtype == np.float32:
        return name, []
    return f"{name}{SEP}f32", [helper.make_node("Cast", [f"{name}{SEP}f32"], [name],
                                                name=f"{name}{SEP}cast_out",
                                                to=_FLOAT_TYPES[spec.dtype])]


def _narrowest(lo: int, hi: int) -> type[np.integer]:
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return np.int32


def _nbytes(tensor: TensorProto) -> int:
    return len(tensor.raw_data) if tensor.raw_data else tensor.ByteSize()


# --- verification ------------------------------------------------------------------------------


def _verify_compact(model: onnx.ModelProto, rebuilt: list[str], reference: Any,
                    input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Check on onnxruntime CPU that folding removed the rebuild nodes and outputs agree."""
    with tempfile.TemporaryDirectory(prefix="weightpack-onnx-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        sess, _ = make_session(model, None, [CPU], optimized_model_path=optimized_path)
        optimized = onnx.load(str(optimized_path), load_external_data=False)
    helpers = _helper_names(model, rebuilt)
    used = {t.name for t in optimized.graph.initializer}
    used |= {i for n in optimized.graph.node for i in n.input}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((_VERIFY_BATCH, *input_shape), dtype=np.float32)
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x})[0]
    want = reference.run(None, {reference.get_inputs()[0].name: x})[0]
    return {"folded": not (helpers & used), "exact": bool(np.array_equal(got, want)),
            "max_abs_diff": float(np.abs(got - want).max())}


def _helper_names(model: onnx.ModelProto, rebuilt: list[str]) -> set[str]:
    prefixes = tuple(f"{n}{SEP}" for n in rebuilt)
    return {t.name for t in model.graph.initializer if t.name.startswith(prefixes)}
