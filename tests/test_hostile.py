"""Hostile files (issue 10, items 1-3): each attack a service could meet in a file it did not
make, shown to fail safely with the project's own exception."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import runtime
from packer.index_builder import build_index
from runtime import decode as decode_module, loader, zoo
from runtime.cli import main as runtime_cli
from runtime.coders import CodedStream, _ans, _packed, decode, encode
from runtime.decode import decode_state_dict
from runtime.errors import (
    ArchitectureError,
    CorruptBlob,
    FormatError,
    LimitExceeded,
    WeightpackError,
)
from runtime.format.index import parse_index
from runtime.format.reader import open_packed
from runtime.format.records import InputSpec
from runtime.onnx import fp32_graph, session
from runtime.tensors import RawTensor
from tests.hostile import (
    builder_file,
    external_tensor,
    graph_model,
    sparse_leak_graph,
    write_graph_file,
)
from tools.make_corpus import (
    assemble,
    one_symbol_ans_file,
    shared_stream_index,
    split,
    with_model,
    zstd_frame_claiming,
)

CORPUS = Path(__file__).parent / "corpus"
GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.fb"

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
            helper.make_node("Add", ["x", "leak"], ["logits"])]


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
    model = graph_model([helper.make_node("Identity", ["x"], ["logits"])], [])
    init = helper.make_graph([helper.make_node("Constant", [], ["t"],
                                               value=external_tensor("t", "secret.bin", 4))],
                             "init", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                        [4])])
    info = model.training_info.add()
    info.initialization.CopyFrom(init)
    return model


def _weight_with_extra_keys() -> onnx.ModelProto:
    model = graph_model([helper.make_node("Add", ["x", "w"], ["logits"])],
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
        [helper.make_node("Add", ["x", "w"], ["logits"])],
        [external_tensor("w", "weightpack", 4)]))
    out = session(path)(np.ones((2, 1, 2, 2), np.float32))
    np.testing.assert_array_equal(out, np.ones((2, 4), np.float32))


# --- 2. memory: nothing large is allocated before it is checked ---------------------------------


def _refuse(*_args, **_kwargs):
    raise AssertionError("called before the file was checked")


def _small_file(path: Path, builder: str, kwargs_json: str = "{}") -> Path:
    return builder_file(path, {"x": RawTensor(torch.zeros(4), torch.float32)}, builder,
                        kwargs_json)


@pytest.mark.parametrize("builder, kwargs", [
    ("torchvision.resnet50", '{"num_classes": 1000000}'),  # 8 GB classifier
    ("torchvision.regnet_y_128gf", "{}"),  # 645M parameters; builds through .tolist()
])
def test_architecture_is_checked_before_any_real_module_or_tensor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builder: str, kwargs: str) -> None:
    path = _small_file(tmp_path / "small.fb", builder, kwargs)
    monkeypatch.setattr(zoo, "build", _refuse)  # a real build would allocate the model
    monkeypatch.setattr(loader, "decode_state_dict", _refuse)
    with pytest.raises(ArchitectureError, match="do not fit") as info:
        runtime.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_skeleton_keeps_large_tensors_on_meta() -> None:
    module = zoo.build_skeleton("torchvision.resnet50", {"num_classes": 1_000_000})
    assert module.fc.weight.is_meta and module.fc.weight.shape == (1_000_000, 2048)
    assert not module.bn1.weight.is_meta  # small tensors stay real
    assert module.state_dict()["fc.weight"].dtype == torch.float32


def _resnet20_tensors(**override: torch.Tensor) -> dict[str, RawTensor]:
    state = zoo.build("cifar_resnet20").state_dict()
    state.update(override)
    return {name: RawTensor(value, value.dtype) for name, value in state.items()}


def test_a_file_that_fits_loads_through_the_skeleton(tmp_path: Path) -> None:
    tensors = _resnet20_tensors()
    path = builder_file(tmp_path / "r20.fb", tensors)
    module = runtime.load(path)
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    for name, value in module.state_dict().items():
        assert torch.equal(value, tensors[name].values), name


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 1, 1)])
def test_declared_input_the_network_cannot_take_is_refused_at_load(tmp_path: Path,
                                                                    shape) -> None:
    """Fuzz campaign 11 (case 1792): a mutated input spec loaded and then failed in the
    caller's first forward with a torch error; now load refuses it (one meta-device pass)."""
    spec = InputSpec(shape, (0.5,) * shape[0], (0.25,) * shape[0])
    path = builder_file(tmp_path / "in.fb", _resnet20_tensors(), "cifar_resnet20",
                        input_spec=spec)
    if shape == (3, 1, 1):  # a 1x1 image goes through ResNet-20 (padding, global pooling)
        assert runtime.load(path)(torch.zeros(1, *shape)).shape == (1, 10)
        return
    with pytest.raises(ArchitectureError, match=r"declared input \[1, 32, 32\] does not fit"):
        runtime.load(path)


def test_declared_input_with_an_empty_dimension_is_a_format_error(tmp_path: Path) -> None:
    spec = InputSpec((3, 0, 2), (0.5,) * 3, (0.25,) * 3)  # fuzz campaign 11, case 1792
    path = builder_file(tmp_path / "in.fb", {"x": RawTensor(torch.zeros(4), torch.float32)},
                        input_spec=spec)
    with pytest.raises(FormatError, match="empty dimension"):
        open_packed(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weight_of_the_wrong_dtype_is_an_architecture_error(tmp_path: Path,
                                                              dtype: torch.dtype) -> None:
    weight = torch.zeros(16, 3, 3, 3, dtype=dtype)
    path = builder_file(tmp_path / "typed.fb", _resnet20_tensors(**{"conv1.weight": weight}))
    with pytest.raises(ArchitectureError, match=r"'conv1.weight': file (int64|bool) vs "
                                                r"architecture float32"):
        runtime.load(path)
    assert runtime_cli(["verify", str(path)]) == 2


def test_runtime_verify_prints_one_line_for_a_wrong_dtype(tmp_path: Path, capsys) -> None:
    weight = torch.zeros(16, 3, 3, 3, dtype=torch.int64)
    path = builder_file(tmp_path / "typed.fb", _resnet20_tensors(**{"conv1.weight": weight}))
    assert runtime_cli(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "conv1.weight" in err


def test_bool_values_other_than_0_and_1_are_corrupt(tmp_path: Path) -> None:
    path = builder_file(tmp_path / "bool.fb", {"b": RawTensor(torch.ones(8, dtype=torch.bool),
                                                              torch.bool)})
    blob = bytearray(path.read_bytes())
    with open_packed(path) as packed:
        ref = packed.model.tensors[0].values.blob
        start = packed.preamble.data_offset + ref.offset
    blob[start] = 7
    path.write_bytes(_fix_crc(bytes(blob), path))
    with open_packed(path) as packed, pytest.raises(CorruptBlob, match="bool"):
        decode_state_dict(packed)


def _fix_crc(blob: bytes, original: Path) -> bytes:
    """`blob` (a damaged copy of `original`) with its blob checksums recomputed."""
    fields, index, data = split(blob)
    model = parse_index(index)
    fixed = []
    for t in model.tensors:
        streams = {role: replace(s, blob=replace(s.blob, crc32=zlib.crc32(
            data[s.blob.offset:s.blob.offset + s.blob.length]))) for role, s in t.streams()}
        fixed.append(replace(t, **streams))
    return assemble(fields, build_index(replace(model, tensors=tuple(fixed))), data)


def test_raw_values_must_be_stored_at_the_tensors_dtype_or_a_float(tmp_path: Path) -> None:
    path = builder_file(tmp_path / "mixed.fb",
                        {"w": RawTensor(torch.ones(4, dtype=torch.bool), torch.float32)})
    with open_packed(path) as packed, pytest.raises(FormatError, match="stored as bool"):
        decode_state_dict(packed)


def test_ans_count_beyond_what_the_payload_holds_is_refused_unread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = encode(np.arange(64) % 2, 2, "ans")  # 1 bit per symbol
    monkeypatch.setattr(_ans.constriction.stream.stack, "AnsCoder", _refuse)
    with pytest.raises(CorruptBlob, match="cannot hold"):
        decode(stream, 1 << 28, 2)


def test_zstd_declared_size_is_checked_before_decompressing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    payload = zstd_frame_claiming(1 << 31)  # 17 bytes that declare 2 GiB
    monkeypatch.setattr(_packed.zstandard, "ZstdDecompressor", _refuse)
    with pytest.raises(CorruptBlob, match="cannot hold"):
        decode(CodedStream("zstd", 1, payload=payload, bits=8), 1 << 31, 256)


def test_memory_error_while_decompressing_is_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = encode(np.zeros(4096, np.uint8), 256, "zstd")

    class Exhausted:
        def decompress(self, *args, **kwargs):
            raise MemoryError

    monkeypatch.setattr(_packed.zstandard, "ZstdDecompressor", Exhausted)
    with pytest.raises(LimitExceeded, match="not enough memory"):
        decode(stream, 4096, 256)


def test_memory_error_while_decoding_a_tensor_is_a_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = builder_file(tmp_path / "r20.fb", _resnet20_tensors())

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(decode_module, "unshuffle_bytes", exhausted)
    with pytest.raises(LimitExceeded, match="not enough memory to decode tensor") as info:
        runtime.load(path)
    assert str(path) in str(info.value)


def test_the_whole_models_declared_size_is_bounded_by_the_files(tmp_path: Path) -> None:
    alignment = [0] * 9 + [64]  # the preamble fields one_symbol_ans_file reads
    big, fits = tmp_path / "big.fb", tmp_path / "fits.fb"
    big.write_bytes(one_symbol_ans_file(alignment, 1 << 28))
    assert big.stat().st_size < 1024
    with pytest.raises(LimitExceeded, match="268,435,456 elements in total"):
        open_packed(big)
    fits.write_bytes(one_symbol_ans_file(alignment, 1 << 20))  # 4 MiB of zeros: allowed
    with open_packed(fits) as packed:
        assert decode_state_dict(packed)["w"].shape == (1 << 20,)


def test_one_table_referenced_many_times_is_refused_at_once() -> None:
    golden = parse_index(split(GOLDEN.read_bytes())[1])
    index = shared_stream_index(golden, 300)
    assert len(index) < 400_000  # 300 tensors x 320 KB of tables if each were copied
    with pytest.raises(LimitExceeded, match="referenced more than once"):
        parse_index(index)


# --- 3. other untyped exceptions ---------------------------------------------------------------


def test_inspect_survives_a_0d_codebook(tmp_path: Path, capsys) -> None:
    path = tmp_path / "zero_d.fb"
    path.write_bytes((CORPUS / "zero_d_codebook.fb").read_bytes())
    assert runtime_cli(["inspect", str(path)]) == 0
    assert "K=?" in capsys.readouterr().out
    assert runtime_cli(["verify", str(path)]) == 2


def test_inspect_escapes_control_characters_in_names(tmp_path: Path, capsys) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2Jw\nfake row\r"
    path = builder_file(tmp_path / "names.fb", {hostile: RawTensor(torch.zeros(2),
                                                                   torch.float32)})
    assert runtime_cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b]0;owned\\x07" in out and "fake row" not in out.splitlines()[2][:8]
    assert runtime_cli(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["name"] == hostile


def test_a_graph_weight_of_zero_dimensions_loads(tmp_path: Path) -> None:
    """Found by the fuzzer's seeds: 0-d weights became shape (1,) on their way to onnxruntime
    (np.ascontiguousarray returns at least one dimension)."""
    scalar = TensorProto(name="s", data_type=TensorProto.FLOAT, dims=[])
    scalar.data_location = TensorProto.EXTERNAL
    scalar.external_data.add(key="location", value="weightpack")
    path = write_graph_file(tmp_path / "scalar.fb", graph_model(
        [helper.make_node("Add", ["x", "s"], ["logits"])], [scalar]),
        {"s": RawTensor(torch.tensor(2.5), torch.float32)})
    np.testing.assert_array_equal(session(path)(np.zeros((1, 1, 2, 2), np.float32)),
                                  np.full((1, 4), 2.5, np.float32))
    assert onnx.numpy_helper.to_array(fp32_graph(path).graph.initializer[0]).shape == ()


@pytest.mark.parametrize("dims", [["N", 1, 2, 3], ["N", 1, 2], [1, 1, 2, 2], ["N", 2, 2, 2]])
def test_graph_input_must_fit_the_files_input_spec(tmp_path: Path, dims: list) -> None:
    """Found by the fuzzer: a graph whose input disagrees with the input spec loaded, then
    failed in onnxruntime with its own exception at the first forward pass."""
    model = graph_model([helper.make_node("Add", ["x", "w"], ["logits"])],
                        [external_tensor("w", "weightpack", 4)])
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
    path = write_graph_file(tmp_path / "input.fb", model)
    with pytest.raises(ArchitectureError, match="input"):
        runtime.load(path)


def test_a_graph_that_onnxruntime_cannot_run_raises_the_projects_error(tmp_path: Path) -> None:
    """Found by the fuzzer: a Conv bias of the wrong length passes onnx's checker and session
    creation, and onnxruntime's own `Fail` escaped from the first forward pass."""
    weight = external_tensor("w", "weightpack", 2)
    weight.dims[:] = [2, 1, 1, 1]
    bias = external_tensor("b", "weightpack", 3)
    model = graph_model([helper.make_node("Conv", ["input", "w", "b"], ["y"]),
                         helper.make_node("Flatten", ["y"], ["logits"])], [weight, bias])
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "K"
    path = write_graph_file(tmp_path / "bias.fb", model, {
        "w": RawTensor(torch.ones(2, 1, 1, 1), torch.float32),
        "b": RawTensor(torch.zeros(3), torch.float32)})
    module = runtime.load(path)  # onnxruntime accepts the graph ...
    with pytest.raises(WeightpackError, match="onnxruntime cannot run") as info:
        module(torch.zeros(1, 1, 2, 2))  # ... and fails only when it runs
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["torchvision.regnet_x_400mf", "timm.vitamin_base_224",
                                  "timm.swinv2_large_window12_192"])
def test_skeletons_of_builders_that_compute_while_building(name: str) -> None:
    """RegNet reads widths back from tensors (only the partial meta mode works); ViTamin
    mixes small and large tensors in one op, Swin-V2 reads a large table (only the full meta
    device works). Both are tried before anything real is built."""
    pytest.importorskip("timm") if name.startswith("timm.") else None
    module = zoo.build_skeleton(name)
    assert any(p.is_meta for p in module.parameters())


@pytest.mark.parametrize("depth", [65, 900, 200_000])
def test_deep_json_is_refused_whatever_the_callers_stack(tmp_path: Path, depth: int) -> None:
    """Nesting the parser survives at one stack depth may not survive at another (900 levels
    opened, then `runtime inspect --json` could not print them): a fixed cap of 64 levels."""
    deep = "[" * depth + "]" * depth
    path = tmp_path / "deep.fb"
    path.write_bytes(with_model(GOLDEN.read_bytes(), lambda m: replace(m, metadata_json=deep)))
    with pytest.raises(LimitExceeded, match="nests deeper than 64 levels"):
        open_packed(path)
    ok = "[" * 64 + "]" * 64
    path.write_bytes(with_model(GOLDEN.read_bytes(), lambda m: replace(m, metadata_json=ok)))
    open_packed(path).close()


def test_error_messages_escape_names_from_the_file(tmp_path: Path, capsys) -> None:
    hostile = "\x1b]0;owned\x07w\nfake"
    path = builder_file(tmp_path / "names.fb", {hostile: RawTensor(torch.ones(64),
                                                                   torch.float32)})
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF  # inside the tensor's values: its checksum now fails
    path.write_bytes(bytes(blob))
    assert runtime_cli(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert "CRC-32" in err and "\\x1b]0;owned\\x07w\\nfake" in err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1
