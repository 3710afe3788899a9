"""ONNX graphs of packed models: export, weight-free copies, and safe parsing of stored graphs.

Every graph here names its weights after the file's tensors, so the weights can travel
separately: a weight-free graph declares them as external data at the pseudo-location
``weightpack``, and the session or exporter supplies them from the decoded file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from runtime.decode import decode_tensor
from runtime.errors import ArchitectureError, FormatError, LimitExceeded
from runtime.format.dtypes import numpy_dtype
from runtime.format.reader import PackedFile, open_packed
from runtime.format.records import TensorRecord

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXTERNAL_LOCATION = "weightpack"
MAX_GRAPH_BYTES = 64 << 20  # a weight-free graph is structure only; real ones are < 1 MiB
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                "uint64_data", "string_data")


@dataclass(frozen=True)
class WeightSpec:
    """What a weight-free graph expects to be supplied for one external initializer."""

    shape: tuple[int, ...]
    dtype: np.dtype


# --- export ----------------------------------------------------------------------------------


def export_module(module: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Trace `module` to ONNX (opset 17, IR 10) with initializers named as its state_dict.

    `input_shape` is one sample's shape (C, H, W), as in the file's InputSpec; the graph
    input "input" gets a dynamic batch axis in front, the output is "logits". Constant
    folding is off so weights keep their names, and the exporter's de-duplication of equal
    tensors is undone, so every state_dict name the graph uses is its own initializer.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ArchitectureError(f"input shape {shape} cannot be exported to ONNX")
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.zeros((1, *shape), dtype=torch.float32, device=device)
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation and constant-folding chatter
            torch.onnx.export(
                module, (dummy,), buffer, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ArchitectureError(
            f"the model cannot be exported to ONNX ({type(exc).__name__}: {first})") from None
    finally:
        module.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    _undo_deduplication(model.graph)
    model.ir_version = IR_VERSION
    return model


def _undo_deduplication(graph: onnx.GraphProto) -> None:
    """Turn `Identity(initializer)` nodes back into initializers of their own name.

    The TorchScript exporter keeps one copy of equal-valued parameters (e.g. freshly
    initialised BatchNorm ones and zeros) and aliases the rest through Identity nodes.
    """
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if (node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS
                and len(node.input) == 1 and node.input[0] in inits
                and node.output[0] not in graph_outputs and node.output[0] not in inits):
            alias = TensorProto()
            alias.CopyFrom(inits[node.input[0]])
            alias.name = node.output[0]
            graph.initializer.append(alias)
            inits[alias.name] = graph.initializer[-1]
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


# --- weight-free graphs ----------------------------------------------------------------------


def weight_free(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` whose initializers in `names` hold no data, only name/shape/dtype.

    They are declared as external data at location "weightpack", which names no real file:
    the caller must supply them (SessionOptions.add_external_initializers, or fill_weights).
    """
    present = {t.name for t in model.graph.initializer}
    missing = sorted(set(names) - present)
    if missing:
        raise ArchitectureError(f"{missing[0]!r} is not an initializer of the graph")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in names:
            for field in _DATA_FIELDS:
                tensor.ClearField(field)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", EXTERNAL_LOCATION
    return out


def external_weights(model: onnx.ModelProto) -> dict[str, WeightSpec]:
    """The initializers a weight-free graph expects to be supplied, with shape and dtype."""
    out: dict[str, WeightSpec] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            out[tensor.name] = WeightSpec(tuple(int(d) for d in tensor.dims),
                                          _np_dtype(tensor.data_type, tensor.name))
    return out


def fill_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Put `weights` inline into the weight-free `model`'s external initializers (in place)."""
    specs = external_weights(model)
    check_weights(specs, weights)
    for tensor in model.graph.initializer:
        if tensor.name in specs:
            value = np.require(weights[tensor.name], requirements="C")  # 0-d stays 0-d
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def check_weights(specs: dict[str, WeightSpec], weights: dict[str, np.ndarray]) -> None:
    """Every expected weight is supplied with its declared shape and dtype."""
    for name, spec in specs.items():
        value = weights.get(name)
        if value is None:
            raise ArchitectureError(f"graph weight {name!r} is not among the file's tensors")
        if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
            raise ArchitectureError(
                f"graph weight {name!r} is declared {spec.dtype}{list(spec.shape)}, the file "
                f"holds {value.dtype}{list(value.shape)}")


def _np_dtype(data_type: int, name: str) -> np.dtype:
    if data_type in (TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.UNDEFINED):
        raise ArchitectureError(f"graph weight {name!r} has a type the ONNX backend cannot feed")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError):
        raise ArchitectureError(
            f"graph weight {name!r} has unknown ONNX type {data_type}") from None


# --- graphs of packed files ------------------------------------------------------------------


def graph_and_weights(packed: PackedFile) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The file's model as a weight-free graph plus the decoded fp32 weights it expects.

    Builder files are rebuilt with runtime.load and exported; onnx_graph files use their
    stored graph, validated first (`load_stored_graph`).
    """
    kind = packed.model.architecture.kind
    if kind == "builder":
        from runtime.loader import load  # deferred: the loader may import this package

        module = load(packed.path)
        exported = export_module(module, packed.model.input.shape)
        state = module.state_dict()
        names = {t.name for t in exported.graph.initializer if t.name in state}
        weights = {n: _to_numpy(state[n], n) for n in names}
        return weight_free(exported, names), weights
    if kind == "onnx_graph":
        if packed.model.activation_quant or packed.model.channel_gates:
            feature = ("quantizes activations (feature 'activation_quant')"
                       if packed.model.activation_quant
                       else "gates channels (feature 'channel_gating')")
            raise ArchitectureError(
                f"{packed.path}: the file {feature}, which the runtime applies to zoo "
                "architectures only, not to a model stored as an ONNX graph")
        graph = load_stored_graph(packed)
        specs = external_weights(graph)
        records = {t.name: t for t in packed.model.tensors}
        try:
            _check_records(specs, records)
        except ArchitectureError as exc:
            raise ArchitectureError(f"{packed.path}: {exc}") from None
        weights = {n: _to_numpy(decode_tensor(packed, records[n]).dequantize(), n)
                   for n in specs}
        check_weights(specs, weights)
        return graph, weights
    raise ArchitectureError(f"architecture kind {kind!r} has no ONNX graph")


def _check_records(specs: dict[str, WeightSpec], records: dict[str, TensorRecord]) -> None:
    """The file declares every graph weight with the graph's shape and dtype: checked on the
    index, before any tensor is decoded (after decoding, `check_weights` checks the arrays)."""
    for name, spec in specs.items():
        record = records[name]  # _check_external_data made sure the name is there
        dtype = None if record.dtype == "bfloat16" else numpy_dtype(record.dtype)
        if record.shape != spec.shape or dtype != spec.dtype:
            raise ArchitectureError(
                f"{name!r}: the graph declares {spec.dtype}{list(spec.shape)}, the file holds "
                f"{record.dtype}{list(record.shape)}")


def fp32_graph(packed_path: str | os.PathLike) -> onnx.ModelProto:
    """The packed file's model as a standalone ONNX graph with its fp32 weights inline."""
    with open_packed(packed_path) as packed:
        graph, weights = graph_and_weights(packed)
    return fill_weights(graph, weights)


def load_stored_graph(packed: PackedFile) -> onnx.ModelProto:
    """Parse and validate an onnx_graph file's weight-free graph blob.

    Refused (ArchitectureError): anything but the default ONNX domain, model-local
    functions, external data anywhere except main-graph initializers named after the file's
    tensors at the pseudo-location "weightpack" (anything else would make onnxruntime read
    other files), and graphs that fail onnx's checker.
    """
    ref = packed.model.architecture.graph
    if ref is None:
        raise FormatError(f"{packed.path}: onnx_graph architecture without a graph blob")
    if ref.length > MAX_GRAPH_BYTES:
        raise LimitExceeded(f"{packed.path}: ONNX graph is {ref.length} bytes, over the "
                            f"{MAX_GRAPH_BYTES}-byte cap for a weight-free graph")
    data = bytes(packed.blob(ref, "architecture/graph"))
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise ArchitectureError(f"{packed.path}: the graph blob is not an ONNX model") from None
    if model.ByteSize() > len(data):
        raise ArchitectureError(f"{packed.path}: the graph blob parses to more than it holds")
    try:
        _validate_graph(model, {t.name for t in packed.model.tensors},
                        packed.model.input.shape)
    except ArchitectureError as exc:
        raise ArchitectureError(f"{packed.path}: {exc}") from None
    return model


def _validate_graph(model: onnx.ModelProto, tensor_names: set[str],
                    input_shape: tuple[int, ...]) -> None:
    for opset in model.opset_import:
        if opset.domain not in _DEFAULT_DOMAINS:
            raise ArchitectureError(f"the graph imports operator domain {opset.domain!r}; only "
                                    "the default ONNX domain is allowed")
    _check_external_data(model, tensor_names)
    if len(model.functions):
        raise ArchitectureError("the graph defines functions; only default ONNX operators "
                                "are allowed")
    graph = model.graph
    if len(graph.sparse_initializer):
        raise ArchitectureError("the graph has sparse initializers, which are not supported")
    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            _np_dtype(tensor.data_type, tensor.name)
    _check_nodes(graph)
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    if len(inputs) != 1 or not len(graph.output):
        raise ArchitectureError(f"the graph has {len(inputs)} data inputs and "
                                f"{len(graph.output)} outputs; one input and an output needed")
    _check_input(inputs[0], input_shape)
    try:
        onnx.checker.check_model(_with_placeholders(model))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(f"the graph fails onnx's checker ({first})") from None


def _check_input(value: onnx.ValueInfoProto, input_shape: tuple[int, ...]) -> None:
    """The graph's input takes what the file's input spec promises callers: float32 batches
    of [N, C, H, W] with a dynamic N (anything else fails only later, inside onnxruntime)."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    fits = (tensor.elem_type == TensorProto.FLOAT and len(dims) == 1 + len(input_shape)
            and dims[0] is None
            and all(d is None or d == want for d, want in zip(dims[1:], input_shape,
                                                              strict=True)))
    if not fits:
        kind = (TensorProto.DataType.Name(tensor.elem_type)
                if tensor.elem_type in TensorProto.DataType.values() else tensor.elem_type)
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise ArchitectureError(
            f"the graph's input {value.name!r} is {kind}[{shown}], but the file's input spec "
            f"promises FLOAT[N, {', '.join(map(str, input_shape))}] with a dynamic N")


def _check_external_data(model: onnx.ModelProto, tensor_names: set[str]) -> None:
    """Refuse every tensor anywhere in the model that names external data, except the main
    graph's initializers that are the file's own weights at the pseudo-location "weightpack".

    onnxruntime resolves any other location against the working directory, so a graph could
    otherwise turn a local file's bytes into its output. Written by hand because no onnx
    helper visits all of these places: every graph and subgraph (node attributes `g` and
    `graphs`, training-info graphs, function bodies), their dense and sparse initializers,
    and tensor and sparse-tensor attributes (which include `Constant` values).
    """
    own = [("location", EXTERNAL_LOCATION)]
    for tensor in model.graph.initializer:
        entries = [(e.key, e.value) for e in tensor.external_data]
        if tensor.data_location == TensorProto.EXTERNAL or entries:
            if tensor.data_location != TensorProto.EXTERNAL or entries != own:
                raise ArchitectureError(f"graph weight {tensor.name!r} points at external "
                                        "data outside the file")
            if tensor.name not in tensor_names:
                raise ArchitectureError(f"graph weight {tensor.name!r} is not among the "
                                        "file's tensors")
    for where, tensor in _inner_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            raise ArchitectureError(f"{where} {tensor.name!r} is stored as external data")


def _inner_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor of the model but the main graph's dense initializers, labelled by place.

    An explicit stack, not recursion: nesting depth is the file's choice."""
    graphs: list[tuple[str, onnx.GraphProto]] = [("graph", model.graph)]
    nodes: list[tuple[str, onnx.NodeProto]] = []
    for info in model.training_info:
        graphs += [("training graph", info.initialization), ("training graph", info.algorithm)]
    for function in model.functions:
        nodes += [("function", node) for node in function.node]
    while graphs or nodes:
        if graphs:
            where, graph = graphs.pop()
            if where != "graph":  # the main graph's dense initializers are checked apart
                yield from ((f"{where} initializer", t) for t in graph.initializer)
            for sparse in graph.sparse_initializer:
                yield f"{where} sparse initializer", sparse.values
                yield f"{where} sparse initializer", sparse.indices
            nodes += [("subgraph", node) for node in graph.node]
            continue
        _, node = nodes.pop()
        label = f"node {node.name or node.op_type!r} constant"
        for attr in node.attribute:
            for tensor in [*attr.tensors, *([attr.t] if attr.HasField("t") else [])]:
                yield label, tensor
            for sparse in [*attr.sparse_tensors,
                           *([attr.sparse_tensor] if attr.HasField("sparse_tensor") else [])]:
                yield label, sparse.values
                yield label, sparse.indices
            graphs += [("subgraph", g)
                       for g in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]]


def _check_nodes(graph: onnx.GraphProto) -> None:
    """Default-domain operators only, in the graph and every subgraph."""
    stack = [graph]
    while stack:
        for node in stack.pop().node:
            if node.domain not in _DEFAULT_DOMAINS:
                raise ArchitectureError(
                    f"node {node.name or node.op_type!r} uses operator domain "
                    f"{node.domain!r}; only the default ONNX domain is allowed")
            for attr in node.attribute:
                stack += [*([attr.g] if attr.HasField("g") else []), *attr.graphs]


def _with_placeholders(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the checker accepts: external initializers become one-element scalars.

    The checker insists external files exist and sizes match; the real weights are checked
    against the declared shapes separately (`check_weights`) without allocating by them.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            itemsize = _np_dtype(tensor.data_type, tensor.name).itemsize
            del tensor.external_data[:]
            del tensor.dims[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = bytes(itemsize)
    return out


def _to_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        raise ArchitectureError(f"tensor {name!r} is bfloat16, which the ONNX backend cannot feed")
    return np.require(tensor.numpy(), requirements="C")  # keeps 0-d (ascontiguousarray: 1-d)
