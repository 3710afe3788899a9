"""Hostile files (issue 10, items 1-3): each attack a service could meet in a file it did not
make, shown to fail safely with the project's own exception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import runtime
from runtime.errors import ArchitectureError
from runtime.onnx import fp32_graph, session
from tests.hostile import (
    external_tensor,
    graph_model,
    sparse_leak_graph,
    write_graph_file,
)

SECRET = np.array([1.5, 2.5, 3.5, 4.5], np.float32)

# --- 1. embedded ONNX graphs never read another file ------------------------------------------


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a file a hostile graph would like to read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(SECRET.tobytes())
    return tmp_path


def _loaders():
    return [("runtime.load", runtime.load), ("runtime.session", session),
            ("onnx backend", fp32_graph)]


def test_subgraph_sparse_initializer_cannot_read_a_local_file(secret_cwd: Path) -> None:
    path = write_graph_file(secret_cwd / "leak.fb", sparse_leak_graph("secret.bin"))
    for what, load in _loaders():
        with pytest.raises(ArchitectureError, match="external data") as info:
            load(path)
        assert str(path) in str(info.value), what


def _wrap_in_if(node: onnx.NodeProto, out: str = "branch") -> list[onnx.NodeProto]:
    """`node` (producing `out`) inside the then-branch of an If on a constant true."""
    branch = helper.make_graph([node], "then", [],
                               [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4])])
    zeros = helper.make_tensor("z", TensorProto.FLOAT, [4], [0.0] * 4)
    other = helper.make_graph([helper.make_node("Constant", [], [out], value=zeros)], "else", [],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4])])
    true = helper.make_tensor("true", TensorProto.BOOL, [], [True])
    return [helper.make_node("Constant", [], ["cond"], value=true),
            helper.make_node("If", ["cond"], ["leak"], then_branch=branch, else_branch=other),
            helper.make_node("Add", ["input", "leak"], ["logits"])]


def _subgraph_constant() -> onnx.ModelProto:
    value = external_tensor("c", "secret.bin", 4)
    return graph_model(_wrap_in_if(helper.make_node("Constant", [], ["branch"], value=value)),
                       [])


def _subgraph_sparse_constant() -> onnx.ModelProto:
    values = external_tensor("v", "secret.bin", 4)
    indices = helper.make_tensor("i", TensorProto.INT64, [4], [0, 1, 2, 3])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    node = helper.make_node("Constant", [], ["branch"], sparse_value=sparse)
    return graph_model(_wrap_in_if(node), [])


def _subgraph_initializer() -> onnx.ModelProto:
    model = graph_model(_wrap_in_if(helper.make_node("Identity", ["x"], ["branch"])), [])
    then = model.graph.node[1].attribute[0].g
    then.initializer.append(external_tensor("x", "secret.bin", 4))
    return model


def _external_index_of_sparse_initializer() -> onnx.ModelProto:
    model = graph_model(_wrap_in_if(helper.make_node("Identity", ["s"], ["branch"])), [])
    values = helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4)
    indices = helper.make_tensor("s_i", TensorProto.INT64, [4], [0, 0, 0, 0])
    indices.ClearField("int64_data")
    indices.data_location = TensorProto.EXTERNAL
    indices.external_data.add(key="location", value="secret.bin")
    model.graph.node[1].attribute[0].g.sparse_initializer.append(
        helper.make_sparse_tensor(values, indices, [4]))
    return model


def _training_info() -> onnx.ModelProto:
    model = graph_model([helper.make_node("Identity", ["input"], ["logits"])], [])
    init = helper.make_graph([helper.make_node("Constant", [], ["t"],
                                               value=external_tensor("t", "secret.bin", 4))],
                             "init", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                        [4])])
    info = model.training_info.add()
    info.initialization.CopyFrom(init)
    return model


def _weight_with_extra_keys() -> onnx.ModelProto:
    model = graph_model([helper.make_node("Add", ["input", "w"], ["logits"])],
                        [external_tensor("w", "weightpack", 4)])
    model.graph.initializer[0].external_data.add(key="location", value="secret.bin")
    return model


@pytest.mark.parametrize("make", [_subgraph_constant, _subgraph_sparse_constant,
                                  _subgraph_initializer, _external_index_of_sparse_initializer,
                                  _training_info, _weight_with_extra_keys])
def test_external_data_anywhere_in_the_graph_is_refused(secret_cwd: Path, make) -> None:
    path = write_graph_file(secret_cwd / "leak.fb", make())
    for _, load in _loaders():
        with pytest.raises(ArchitectureError, match="external data|outside the file"):
            load(path)


def test_the_projects_own_weights_are_still_accepted(secret_cwd: Path) -> None:
    path = write_graph_file(secret_cwd / "ok.fb", graph_model(
        [helper.make_node("Add", ["input", "w"], ["logits"])],
        [external_tensor("w", "weightpack", 4)]))
    out = session(path).run(np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(out, np.ones((2, 4), np.float32))
