"""The ONNX backend on the shared ResNet-20: sessions, exports, weight-free and stored graphs."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import runtime
from packer.compress import PackRequest, pack
from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime.data import cifar10_dataset, make_loader
from runtime.decode import decode_tensor
from runtime.errors import ArchitectureError, WeightpackError
from runtime.evaluate import evaluate
from runtime.format.reader import open_packed
from runtime.format.records import ArchitectureRecord, ModelRecord
from runtime.onnx import (
    export_module,
    export_onnx,
    external_weights,
    fp32_graph,
    make_session,
    providers_available,
    session,
    weight_free,
)
from runtime.onnx.export import compact_graph
from runtime.onnx.graph import EXTERNAL_LOCATION, graph_and_weights
from runtime.tensors import ScalarCodebookTensor, UniformTensor, VectorCodebookTensor

CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def packed(shared_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The shared ResNet-20 packed with kmeans and with uniform."""
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path_factory.mktemp("onnx")
    files = {}
    for method in ("kmeans", "uniform"):
        files[method] = out / f"r20-{method}.fb"
        pack(PackRequest(source, files[method], method=method, progress=False))
    return files


@pytest.fixture(scope="module")
def stored_graph(packed: dict[str, Path]) -> onnx.ModelProto:
    """The kmeans file's weight-free graph, as an onnx_graph file would store it."""
    with open_packed(packed["kmeans"]) as f:
        graph, _ = graph_and_weights(f)
    return graph


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def torch_logits(path: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return runtime.load(path)(torch.from_numpy(x)).numpy()


def write_graph_file(source: Path, out: Path, graph: bytes) -> Path:
    """Re-pack `source`'s tensors with architecture kind onnx_graph and `graph` as its blob."""
    data = DataSection(64)
    encoder = Encoder(data, "zstd")
    with open_packed(source) as f:
        records = tuple(encoder.tensor(t.name, decode_tensor(f, t)).record
                        for t in f.model.tensors)
        model = f.model
    ref = data.add(graph)
    write_packed(out, ModelRecord(
        producer=model.producer, method=model.method,
        method_config_json=model.method_config_json, source_sha256=model.source_sha256,
        architecture=ArchitectureRecord("onnx_graph", graph=ref), input=model.input,
        num_classes=model.num_classes, tensors=records, fp32_bytes=model.fp32_bytes), data)
    return out


# --- torch vs onnxruntime ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_session_agrees_with_torch(packed: dict[str, Path], method: str) -> None:
    sess = session(packed[method])
    assert sess.provider == CPU and sess.input_name == "input"
    x = np.random.default_rng(1).standard_normal((256, 3, 32, 32), dtype=np.float32)
    got, want = sess(x), torch_logits(packed[method], x)
    assert got.shape == (256, 10)
    print(f"{method}: max abs diff {np.abs(got - want).max():.3g}, relative "
          f"{relative_diff(got, want):.3g}, session built in {sess.build_seconds:.2f} s")
    assert relative_diff(got, want) < 1e-4


def test_session_is_an_onnxruntime_inference_session(packed: dict[str, Path]) -> None:
    """Code written for onnxruntime runs on it unchanged; `sess(x)` is the shortcut."""
    sess = runtime.session(packed["kmeans"], providers=[CPU])
    assert isinstance(sess, ort.InferenceSession)
    [inp], [out] = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("input", "logits") and inp.shape[1:] == [3, 32, 32]
    assert sess.get_providers() == [CPU] and sess.get_modelmeta() is not None
    x = np.random.default_rng(4).standard_normal((4, 3, 32, 32), dtype=np.float32)
    logits = sess.run(None, {inp.name: x})[0]
    assert logits.shape == (4, 10)
    np.testing.assert_array_equal(sess.run([out.name], {inp.name: x})[0], logits)
    np.testing.assert_array_equal(sess(x), logits)  # numpy in, numpy out
    as_torch = sess(torch.from_numpy(x))  # torch in, torch out: an eval model
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(logits))
    assert sess.provider == CPU and sess.build_seconds > 0


def test_top1_agrees_with_torch_on_real_images(packed: dict[str, Path], shared_dir: Path) -> None:
    path = packed["kmeans"]
    with open_packed(path) as f:
        spec = f.model.input
    batches = list(make_loader(cifar10_dataset(shared_dir / "data" / "cifar10", spec=spec),
                               batch_size=250, workers=0, limit=1000))
    sess, model = session(path), runtime.load(path)
    same = hits = total = 0
    with torch.inference_mode():
        for batch in batches:
            ort_top1 = sess(batch.images.numpy()).argmax(1)
            same += int((ort_top1 == model(batch.images).argmax(1).numpy()).sum())
            hits += int((ort_top1 == batch.targets.numpy()).sum())
            total += len(ort_top1)
    print(f"top-1 agreement torch vs onnxruntime: {same}/{total}")
    assert total == 1000 and same / total >= 0.999
    by_eval = evaluate(sess, batches, progress=False)  # a session is a valid eval model
    assert by_eval.images == 1000 and by_eval.top1 == pytest.approx(100 * hits / total)


# --- exports -----------------------------------------------------------------------------------


def test_standalone_and_compact_exports_round_trip(packed: dict[str, Path],
                                                   tmp_path: Path) -> None:
    path = packed["kmeans"]
    x = np.random.default_rng(2).standard_normal((16, 3, 32, 32), dtype=np.float32)
    reference = session(path)(x)
    reports = {}
    for compact in (False, True):
        out = tmp_path / f"r20-{'compact' if compact else 'fp32'}.onnx"
        reports[compact] = report = export_onnx(path, out, compact=compact)
        assert report["onnx_bytes"] == out.stat().st_size
        assert report["packed_bytes"] == path.stat().st_size and report["folded"]
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        assert not external_weights(model)  # self-contained
        sess, provider = make_session(model, providers=[CPU])
        np.testing.assert_array_equal(sess.run(None, {"input": x})[0], reference)
    fp32, compact = reports[False], reports[True]
    print(f"standalone {fp32['onnx_bytes']} B, compact {compact['onnx_bytes']} B, "
          f"packed {compact['packed_bytes']} B")
    assert compact["rebuilt"] == 20 and compact["exact"] and compact["max_abs_diff"] == 0.0
    assert compact["onnx_bytes"] * 3 < fp32["onnx_bytes"]


def test_compact_export_of_uniform_codes_is_exact(packed: dict[str, Path],
                                                  tmp_path: Path) -> None:
    report = export_onnx(packed["uniform"], tmp_path / "u.onnx", compact=True)
    assert report["folded"] and report["exact"] and report["rebuilt"] == 20
    types = {t.data_type for t in onnx.load(str(tmp_path / "u.onnx")).graph.initializer
             if t.name.endswith("::codes")}
    assert types == {TensorProto.INT8}


def test_compact_graph_rebuilds_every_scheme_exactly() -> None:
    """Vector codebooks, uint16 indices into an fp16 codebook, asymmetric and per-tensor grids."""
    g = torch.Generator().manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 64),
        torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    compressed = {
        "0.weight": VectorCodebookTensor(torch.randn(16, 4, generator=g),
                                         torch.randint(0, 16, (108,), generator=g),
                                         (16, 3, 3, 3)),
        "2.weight": ScalarCodebookTensor(torch.randn(300, generator=g).half(),
                                         torch.randint(0, 300, (32, 16, 3, 3), generator=g)),
        "5.weight": UniformTensor(torch.randint(0, 16, (64, 32), generator=g),
                                  torch.rand(64, generator=g) / 10,
                                  torch.randint(0, 16, (64,), generator=g), 4, 0),
        "7.weight": UniformTensor(torch.randint(-255, 256, (10, 64), generator=g),
                                  torch.tensor([0.003]), None, 9, None),
    }
    with torch.no_grad():
        for name, tensor in compressed.items():
            module.get_parameter(name).copy_(tensor.dequantize())
    state = module.state_dict()
    weights = {n: state[n].numpy() for n in state}
    free = weight_free(export_module(module, (3, 8, 8)), set(weights))
    model, rebuilt = compact_graph(free, weights, compressed)
    assert sorted(rebuilt) == sorted(compressed)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["2.weight::indices"] == TensorProto.UINT16
    assert types["2.weight::codebook"] == TensorProto.FLOAT16
    assert types["5.weight::codes"] == TensorProto.UINT8
    assert types["7.weight::codes"] == TensorProto.INT16
    onnx.checker.check_model(model)
    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8), dtype=np.float32)
    got = make_session(model, providers=[CPU])[0].run(None, {"input": x})[0]
    want = make_session(free, weights, [CPU])[0].run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)


def test_fp32_graph_of_a_builder_file_is_standalone(packed: dict[str, Path]) -> None:
    model = fp32_graph(packed["uniform"])
    onnx.checker.check_model(model)
    assert model.ir_version == 10 and not external_weights(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]


# --- weight-free graphs and memory injection -------------------------------------------------


def test_weight_free_graphs_carry_no_weight_bytes() -> None:
    module = runtime.zoo.build("cifar_resnet20", {}).eval()  # fresh: BN ones/zeros repeat
    full = export_module(module, (3, 32, 32))
    state = module.state_dict()
    names = {t.name for t in full.graph.initializer}
    assert {n for n, t in state.items() if t.is_floating_point()} <= names
    assert not any(n.op_type == "Identity" for n in full.graph.node)  # de-duplication undone
    free = weight_free(full, names)
    for t in free.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL and not t.raw_data
        assert not (t.float_data or t.int64_data or t.int32_data or t.double_data)
        assert [(e.key, e.value) for e in t.external_data] == [("location", EXTERNAL_LOCATION)]
    specs = external_weights(free)
    assert specs["conv1.weight"].shape == (16, 3, 3, 3)
    assert specs["conv1.weight"].dtype == np.float32
    weight_bytes = sum(4 * state[n].numel() for n in names)
    assert free.ByteSize() < 0.1 * weight_bytes < full.ByteSize()


def test_session_injects_weights_from_memory(packed: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    handed: list[tuple[int, int]] = []

    def spy(model: onnx.ModelProto, initializers, providers=None, **kwargs):
        handed.append((model.ByteSize(), sum(a.nbytes for a in initializers.values())))
        return make_session(model, initializers, providers, **kwargs)

    # the package re-exports the function `session`, which shadows the module's name
    monkeypatch.setattr(sys.modules["runtime.onnx.session"], "make_session", spy)
    sess = session(packed["kmeans"])
    sess(np.zeros((2, 3, 32, 32), np.float32))
    assert os.listdir(scratch) == []
    [(graph_bytes, weight_bytes)] = handed  # onnxruntime gets a weight-free graph + arrays
    assert graph_bytes < 64 << 10 and weight_bytes > 1 << 20


def test_missing_or_misshapen_injected_weight_is_an_architecture_error(
        stored_graph: onnx.ModelProto) -> None:
    with pytest.raises(ArchitectureError, match="not among the file's tensors"):
        make_session(stored_graph, {}, [CPU])
    specs = external_weights(stored_graph)
    weights = {n: np.zeros(s.shape, s.dtype) for n, s in specs.items()}
    weights["conv1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ArchitectureError, match="conv1.weight"):
        make_session(stored_graph, weights, [CPU])


def test_gpu_provider_falls_back_to_cpu_with_one_warning(stored_graph: onnx.ModelProto) -> None:
    assert providers_available()[-1] == CPU
    weights = {n: np.zeros(s.shape, s.dtype) for n, s in external_weights(stored_graph).items()}
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: CUDA may start, so nothing falls back")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, used = make_session(stored_graph, weights)  # default: CPU, no GPU attempt
        assert used == CPU and not caught
        _, used = make_session(stored_graph, weights, ["TensorrtExecutionProvider",
                                                       "CUDAExecutionProvider"])
    assert used == CPU
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "\n" not in str(caught[0].message) and CPU in str(caught[0].message)
    with pytest.raises(WeightpackError, match="unknown execution provider"):
        make_session(stored_graph, weights, ["NoSuchExecutionProvider"])


# --- onnx_graph files --------------------------------------------------------------------------


def test_onnx_graph_file_runs_like_the_builder_file(packed: dict[str, Path],
                                                    stored_graph: onnx.ModelProto,
                                                    tmp_path: Path) -> None:
    path = write_graph_file(packed["kmeans"], tmp_path / "graph.fb",
                            stored_graph.SerializeToString())
    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32), dtype=np.float32)
    want = session(packed["kmeans"])(x)
    np.testing.assert_array_equal(session(path)(x), want)
    sess, _ = make_session(fp32_graph(path), providers=[CPU])
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], want)
    report = export_onnx(path, tmp_path / "graph.onnx", compact=True)
    assert report["exact"] and report["folded"] and report["rebuilt"] == 20


def _renamed_weight(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].name = "not.in.the.file"
    for node in m.graph.node:
        node.input[:] = ["not.in.the.file" if i == "conv1.weight" else i for i in node.input]


def _custom_domain(m: onnx.ModelProto) -> None:
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.domain = "com.example"


def _custom_node_only(m: onnx.ModelProto) -> None:
    next(n for n in m.graph.node if n.op_type == "Relu").domain = "com.microsoft"


def _function(m: onnx.ModelProto) -> None:
    m.functions.append(helper.make_function(
        "", "MyRelu", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_opsetid("", 17)]))


def _external_constant(m: onnx.ModelProto) -> None:
    value = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="/etc/passwd")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=value))


def _weight_elsewhere(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].external_data[0].value = "../secrets.bin"


@pytest.mark.parametrize("corrupt, message", [
    (_renamed_weight, "not among the file's tensors"),
    (_custom_domain, "domain 'com.example'"),
    (_custom_node_only, "domain 'com.microsoft'"),
    (_function, "functions"),
    (_external_constant, "external data"),
    (_weight_elsewhere, "outside the file"),
    (None, "not an ONNX model"),
])
def test_bad_onnx_graph_is_rejected(packed: dict[str, Path], stored_graph: onnx.ModelProto,
                                    tmp_path: Path, corrupt, message: str) -> None:
    if corrupt is None:
        blob = b"\x08\x07\x12\xff\xff\xff\x0fnot onnx"
    else:
        bad = onnx.ModelProto()
        bad.CopyFrom(stored_graph)
        corrupt(bad)
        blob = bad.SerializeToString()
    path = write_graph_file(packed["kmeans"], tmp_path / "bad.fb", blob)
    for build in (session, fp32_graph):
        with pytest.raises(ArchitectureError, match=message) as info:
            build(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
