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
from tests.packing import CIFAR_SPEC as CIFAR_INPUT

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


def test_calibration_methods_order_and_hooks_are_removed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    batches = [torch.randn(4, 3, 8, 8, generator=GEN) for _ in range(3)]
    scales = {m: quant.calibrate(model, batches, m) for m in quant.METHODS}
    assert set(scales["minmax"]) == {"0", "3"}
    for name in ("0", "3"):
        assert scales["percentile"][name] <= scales["minmax"][name]
        assert scales["mse"][name] <= scales["minmax"][name]
    assert not model[0]._forward_pre_hooks
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


def test_qdq_graph_structure(qdq: dict[str, onnx.ModelProto]) -> None:
    model = qdq["kmeans"]
    onnx.checker.check_model(model)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = _producer(graph)
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 20
    for node in layers:
        wdq = producer[node.input[1]]
        assert wdq.op_type == "DequantizeLinear"
        assert {a.name: a.i for a in wdq.attribute}.get("axis") == 0
        assert inits[wdq.input[0]].dtype == np.int8
        assert inits[wdq.input[0]].min() >= -127
        assert inits[wdq.input[1]].shape == (inits[wdq.input[0]].shape[0],)
        adq = producer[node.input[0]]
        assert adq.op_type == "DequantizeLinear"
        assert producer[adq.input[0]].op_type == "QuantizeLinear"
        assert inits[adq.input[1]].shape == () and inits[adq.input[1]].dtype == np.float32
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    # No fp32 weight is left in the graph.
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim in (2, 4)]


def test_onnx_int8_agrees_with_torch_fake_quant(packs, scales, qdq, test_images,
                                               record_property) -> None:
    images, _ = test_images
    for method, p in packs.items():
        fq = quant.fake_quant_module(p.module, scales[method], p.weights)
        with torch.inference_mode():
            torch_logits = fq(images)
        ort_logits = quant.OrtModel(qdq[method], threads=1)(images)
        agree = (torch_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item()
        diff = (torch_logits - ort_logits).abs().max().item()
        record_property(f"{method}_max_abs_logit_diff", diff)
        assert agree >= 0.99, (method, agree, diff)


def test_int8_top1_within_one_point_of_fp32(packs, scales, test_images) -> None:
    images, targets = test_images
    for method, p in packs.items():
        fq = quant.fake_quant_module(p.module, scales[method], p.weights)
        with torch.inference_mode():
            fp32 = (p.module(images).argmax(1) == targets).float().mean().item() * 100
            int8 = (fq(images).argmax(1) == targets).float().mean().item() * 100
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
        input=CIFAR_INPUT, num_classes=10, tensors=records, fp32_bytes=1,
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
    assert isinstance(quant.int8_model(without, scales["int8"], backend="onnx"), quant.OrtModel)
