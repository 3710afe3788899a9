"""8-bit inference: int8 weights (exact-grid detection), calibration, torch fake-quant and the
ONNX QDQ graph, checked against each other and against fp32 on the shared ResNet-20."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from packer.compress import PackRequest, pack
from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime import quant
from runtime.data import cifar10_dataset, make_loader
from runtime.format.records import ArchitectureRecord, ModelRecord
from runtime.quant.calibrate import AbsHistogram
from runtime.tensors import RawTensor, ScalarCodebookTensor, UniformTensor
from runtime.zoo.specs import CIFAR_SPEC

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(0)


# --- int8 weights ---------------------------------------------------------------------------


def _codebook_tensor(codebook: list[float], shape: tuple[int, ...]) -> ScalarCodebookTensor:
    idx = torch.randint(0, len(codebook), shape, generator=GEN)
    return ScalarCodebookTensor(torch.tensor(codebook, dtype=torch.float32), idx)


def test_power_of_two_and_ternary_codebooks_are_exact() -> None:
    pow2 = [s * 2.0**-e for s in (-1, 1) for e in range(1, 8)] + [0.0]
    for codebook in (pow2, [-0.037, 0.0, 0.037]):
        t = _codebook_tensor(codebook, (16, 8, 3, 3))
        w = t.dequantize()
        q = quant.int8_weight(w, t)
        assert q.exact and q.q.dtype == np.int8 and np.abs(q.q).max() <= 127
        assert torch.equal(q.dequantize(), w)


def test_uniform_grid_is_exact_with_its_own_scales() -> None:
    codes = torch.randint(-7, 8, (8, 4, 3, 3), generator=GEN, dtype=torch.int32)
    scales = torch.rand(8, generator=GEN) * 0.1 + 1e-3
    t = UniformTensor(codes, scales, None, 4, 0)
    q = quant.int8_weight(t.dequantize(), t)
    assert q.exact and np.array_equal(q.scales, scales.numpy())
    assert np.array_equal(q.q, codes.numpy().astype(np.int8))


def test_folding_a_batchnorm_keeps_the_grid() -> None:
    codes = torch.randint(-127, 128, (4, 3, 3, 3), generator=GEN, dtype=torch.int32)
    t = UniformTensor(codes, torch.rand(4, generator=GEN) * 0.1 + 1e-3, None, 8, 0)
    q = quant.int8_weight(t.dequantize(), t)
    factor = np.array([0.5, -2.0, 0.0, 3.0], np.float32)
    folded = q.fold(factor)
    assert folded.exact and folded.q.dtype == np.int8 and np.abs(folded.q).max() <= 127
    assert np.all(folded.scales > 0) and not folded.q[2].any()
    want = t.dequantize() * torch.from_numpy(factor).reshape(-1, 1, 1, 1)
    assert torch.allclose(folded.dequantize(), want, rtol=1e-6, atol=0)


def test_generic_weights_are_not_exact_and_use_max_over_127() -> None:
    w = torch.randn(8, 4, 3, 3, generator=GEN)
    kmeans_like = _codebook_tensor(sorted(torch.randn(32, generator=GEN).tolist()), (8, 16))
    assert not quant.int8_weight(kmeans_like.dequantize(), kmeans_like).exact
    q = quant.int8_weight(w, None)
    assert not q.exact
    assert np.allclose(q.scales, w.abs().amax(dim=(1, 2, 3)).numpy() / 127)
    assert (q.dequantize() - w).abs().max() <= q.scales.max() / 2 + 1e-7


# --- calibration ----------------------------------------------------------------------------


def test_histogram_percentile_tracks_numpy_across_range_growth() -> None:
    h = AbsHistogram()
    chunks = [torch.randn(20_000, generator=GEN) * s for s in (0.1, 1.0, 5.0)]  # range grows
    for c in chunks:
        h.add(c)
    values = torch.cat(chunks).abs().numpy()
    assert h.amax == pytest.approx(values.max())
    assert h.percentile_amax(99.0) == pytest.approx(np.percentile(values, 99.0), rel=0.01)


def test_calibration_methods_order_and_leave_the_model_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 3, 8, 8, generator=GEN) for _ in range(3)]
    scales = {m: quant.calibrate(model, batches, m) for m in quant.METHODS}
    # input of conv "0", its output "0:out", input of linear "3" (ReLU + Flatten stay float)
    assert set(scales["minmax"]) == {"0", "0:out", "3"}
    for name in scales["minmax"]:
        assert scales["percentile"][name] <= scales["minmax"][name]
        assert scales["mse"][name] <= scales["minmax"][name]
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(quant.CalibrationError):
        quant.calibrate(model, [], "minmax")
    with pytest.raises(quant.CalibrationError):
        quant.calibrate(model, batches, "entropy")


# --- on the shared ResNet-20 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def packs(shared_dir: Path, tmp_path_factory) -> dict[str, quant.Int8Pack]:
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path_factory.mktemp("quant")
    loaded = {}
    for method in ("kmeans", "int8"):
        path = out / f"r20-{method}.fb"
        pack(PackRequest(source, path, method, progress=False))
        loaded[method] = quant.load_int8(path)
    return loaded


@pytest.fixture(scope="module")
def cifar(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cifar10"


@pytest.fixture(scope="module")
def test_images(cifar: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(make_loader(cifar10_dataset(cifar, "test", CIFAR_SPEC), 250, 0, limit=1000))
    return torch.cat([b.images for b in batches]), torch.cat([b.targets for b in batches])


@pytest.fixture(scope="module")
def scales(packs: dict[str, quant.Int8Pack], cifar: Path) -> dict[str, dict[str, float]]:
    train = cifar10_dataset(cifar, "train", CIFAR_SPEC)
    return {m: quant.calibrate(p.module, make_loader(train, 128, 0, limit=256))
            for m, p in packs.items()}


@pytest.fixture(scope="module")
def qdq(packs, scales) -> dict[str, onnx.ModelProto]:
    return {m: quant.qdq_model(p, scales[m]) for m, p in packs.items()}


def test_exactness_is_reported_per_layer(packs: dict[str, quant.Int8Pack]) -> None:
    assert all(packs["int8"].exact_layers().values())
    assert len(packs["int8"].exact_layers()) == 20
    assert not any(packs["kmeans"].exact_layers().values())  # K=32 generic codebooks


def _producer(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _is_quantized(name: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """`name` is DequantizeLinear(QuantizeLinear(...))."""
    dq = producer.get(name)
    return (dq is not None and dq.op_type == "DequantizeLinear"
            and producer[dq.input[0]].op_type == "QuantizeLinear")


def test_plan_folds_batchnorm_and_labels_tensors(packs: dict[str, quant.Int8Pack]) -> None:
    module = packs["int8"].module
    plan = quant.build_plan(module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plan.graph.modules())
    assert len(plan.folds) == 19  # every conv of resnet20 has its BatchNorm
    x = torch.randn(8, 3, 32, 32, generator=GEN)
    with torch.inference_mode():
        assert torch.allclose(plan.graph(x), module(x), atol=1e-4)
    labels = plan.scale_labels()
    assert plan.inputs["conv1"] == "conv1" and plan.inputs["linear"] == "linear"
    assert {"conv1:out", "layer1.0.conv2:out", "layer1.0/add", "layer3.2/add"} <= set(labels)
    assert len(labels) == len(set(labels)) == 48  # 20 layer inputs, 19 conv outputs, 9 adds


def test_qdq_graph_structure(qdq: dict[str, onnx.ModelProto], scales) -> None:
    model = qdq["kmeans"]
    onnx.checker.check_model(model)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer, consumers = _producer(graph), _consumers(graph)
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 20
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]  # folded
    for node in layers:
        wdq = producer[node.input[1]]
        assert wdq.op_type == "DequantizeLinear"
        assert {a.name: a.i for a in wdq.attribute}.get("axis") == 0
        assert inits[wdq.input[0]].dtype == np.int8
        assert inits[wdq.input[0]].min() >= -127
        w_scale = inits[wdq.input[1]]
        assert w_scale.shape == (inits[wdq.input[0]].shape[0],)
        assert _is_quantized(node.input[0], producer)
        adq = producer[node.input[0]]
        assert inits[adq.input[1]].shape == () and inits[adq.input[1]].dtype == np.float32
        # bias: int32 codes, scale = input scale x weight scale (what QLinearConv adds)
        bdq = producer[node.input[2]]
        assert bdq.op_type == "DequantizeLinear" and inits[bdq.input[0]].dtype == np.int32
        b_scale = inits[bdq.input[1]]
        assert np.array_equal(b_scale, (inits[adq.input[1]] * w_scale).astype(np.float32))
        assert len(bdq.input) == 2 or not inits[bdq.input[2]].any()
        if node.op_type == "Conv":  # its output is quantized, so it fuses into QLinearConv
            assert [c.op_type for c in consumers[node.output[0]]] == ["QuantizeLinear"]
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(adds) == 9
    for node in adds:  # quantized inputs and output: QLinearAdd
        assert all(_is_quantized(i, producer) for i in node.input)
        assert [c.op_type for c in consumers[node.output[0]]] == ["QuantizeLinear"]
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    names = {t.name for t in graph.initializer}
    assert all(f"{label}.scale" in names for label in scales["kmeans"])
    # No fp32 weight or bias is left in the graph.
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim in (2, 4)]
    assert not [n for n, a in inits.items() if n.endswith(".bias")]


def test_onnxruntime_fuses_the_int8_graph(qdq: dict[str, onnx.ModelProto], tmp_path) -> None:
    path = tmp_path / "optimized.onnx"
    quant.cpu_session(qdq["int8"], threads=1, optimized_path=path)
    ops = quant.graph_types(onnx.load(str(path)))
    assert ops.get("QLinearConv") == 19 and ops.get("QLinearAdd") == 9, ops
    assert "Conv" not in ops and "Add" not in ops and ops.get("QGemm") == 1, ops


@pytest.fixture(scope="module")
def fake_quant_logits(packs, scales, test_images) -> dict[str, torch.Tensor]:
    """Torch fake-quant logits of each packed model on the test images, computed once."""
    images, _ = test_images
    out = {}
    for method, p in packs.items():
        fq = quant.fake_quant_module(p.module, scales[method], p.weights)
        with torch.inference_mode():
            out[method] = fq(images)
    return out


def test_onnx_int8_agrees_with_torch_fake_quant(packs, qdq, test_images, fake_quant_logits,
                                               record_property) -> None:
    images, _ = test_images
    for method in packs:
        torch_logits = fake_quant_logits[method]
        ort_logits = quant.cpu_session(qdq[method], threads=1)(images)
        agree = (torch_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item()
        diff = (torch_logits - ort_logits).abs().max().item()
        record_property(f"{method}_max_abs_logit_diff", diff)
        assert agree >= 0.99, (method, agree, diff)


def test_int8_top1_within_one_point_of_fp32(packs, test_images, fake_quant_logits) -> None:
    images, targets = test_images
    for method, p in packs.items():
        with torch.inference_mode():
            fp32 = (p.module(images).argmax(1) == targets).float().mean().item() * 100
        int8 = (fake_quant_logits[method].argmax(1) == targets).float().mean().item() * 100
        assert int8 >= fp32 - 1.0, (method, fp32, int8)


def test_int8_model_uses_file_scales_or_says_there_are_none(packs, scales, tmp_path) -> None:
    p = packs["int8"]
    tensors = p.module.state_dict()
    data = DataSection(64)
    encoder = Encoder(data, "raw")
    records = tuple(encoder.tensor(name, RawTensor(t.detach().clone(), t.dtype)).record
                    for name, t in tensors.items())
    record = ModelRecord(
        producer="weightpack test", method="test", method_config_json="{}",
        source_sha256="0" * 64, architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"),
        input=CIFAR_SPEC, num_classes=10, tensors=records, fp32_bytes=1,
        activation_scales=tuple(scales["int8"].items()),
        calibration_json=quant.calibration_json("percentile", 256, 99.99))
    with_scales, without = tmp_path / "with.fb", tmp_path / "without.fb"
    write_packed(with_scales, record, data)
    write_packed(without, ModelRecord(**{**record.__dict__, "activation_scales": (),
                                         "calibration_json": ""}), data)
    x = torch.randn(4, 3, 32, 32, generator=GEN)
    model = quant.int8_model(with_scales)
    expected = quant.fake_quant_module(p.module, scales["int8"], p.weights)
    with torch.inference_mode():
        assert torch.allclose(model(x), expected(x), atol=1e-5)
    with pytest.raises(quant.NoActivationScales, match="no activation scales"):
        quant.int8_model(without)
    assert isinstance(quant.int8_model(without, scales["int8"], backend="onnx"),
                      quant.OnnxSession)
    # Files from before output/add quantization hold only layer-input scales: a clear error.
    older = {name: scales["int8"][name] for name in p.weights}
    for backend in quant.BACKENDS:
        with pytest.raises(quant.NoActivationScales, match="cover only layer inputs"):
            quant.int8_model(without, older, backend=backend)
