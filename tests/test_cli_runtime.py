"""The runtime CLI's backends: onnx, int8 (stored or on-the-fly calibration), export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import runtime
from packer.compress import PackRequest, pack
from runtime import cli as runtime_cli, quant


@pytest.fixture(scope="module")
def calibrated(shared_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "r20.fb"
    report = pack(PackRequest(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth",
                              out, "int8", progress=False,
                              calib_data=shared_dir / "data" / "cifar10", calib_images=64,
                              workers=0))
    assert report["file_bytes"] == out.stat().st_size
    return out


def eval_json(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert runtime_cli.main([*argv, "--json", "--no-progress", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_calibration_is_stored_in_the_file(calibrated: Path) -> None:
    with runtime.open_packed(calibrated) as packed:
        scales = dict(packed.model.activation_scales)
        calibration = json.loads(packed.model.calibration_json)
    # every tensor the int8 graph quantizes: layer inputs, conv outputs, residual adds
    assert set(scales) == set(quant.build_plan(runtime.load(calibrated)).scale_labels())
    assert {"conv1", "linear", "conv1:out", "layer1.0/add"} <= set(scales)
    assert calibration["images"] == 64 and calibration["method"] == "percentile"


def test_backends_and_precisions_agree(calibrated: Path, shared_dir: Path, capsys) -> None:
    data = ["--cifar10", str(shared_dir / "data" / "cifar10"), "--limit", "200"]
    torch_fp32 = eval_json(["eval", str(calibrated), *data], capsys)
    onnx_fp32 = eval_json(["eval", str(calibrated), *data, "--backend", "onnx"], capsys)
    onnx_int8 = eval_json(["eval", str(calibrated), *data, "--backend", "onnx", "--int8"],
                          capsys)
    torch_int8 = eval_json(["eval", str(calibrated), *data, "--int8"], capsys)
    assert onnx_fp32["provider"] == "CPUExecutionProvider" and onnx_fp32["backend"] == "onnx"
    assert onnx_fp32["top1"] == torch_fp32["top1"]
    assert onnx_int8["precision"] == torch_int8["precision"] == "int8"
    assert abs(onnx_int8["top1"] - torch_int8["top1"]) <= 1.0
    assert abs(onnx_int8["top1"] - torch_fp32["top1"]) <= 2.0


def test_on_the_fly_calibration_and_missing_scales(calibrated: Path, shared_dir: Path,
                                                  tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.fb"
    pack(PackRequest(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth", plain,
                     "int8", progress=False))
    data = ["--cifar10", str(shared_dir / "data" / "cifar10"), "--limit", "100"]
    assert runtime_cli.main(["eval", str(plain), *data, "--int8", "--no-progress"]) == 2
    assert "no activation scales" in capsys.readouterr().err
    out = eval_json(["eval", str(plain), *data, "--int8", "--calib-data",
                     str(shared_dir / "data" / "cifar10"), "--calib-images", "32"], capsys)
    assert out["precision"] == "int8" and out["images"] == 100


@pytest.mark.parametrize("flags", [[], ["--compact"], ["--int8"]])
def test_export_writes_a_loadable_onnx(calibrated: Path, tmp_path: Path, flags, capsys) -> None:
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert runtime_cli.main(["export", str(calibrated), "--onnx", str(out), *flags,
                             "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx_bytes"] == out.stat().st_size
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    if "--int8" in flags:
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def _zero_point_types(model: onnx.ModelProto) -> set[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2}


def test_int8_export_targets(calibrated: Path, tmp_path: Path, capsys) -> None:
    """--target onnxruntime (the default) writes the graph onnxruntime's CPU kernels fuse
    (uint8 activations): a plain InferenceSession runs QLinearConv without our process's help,
    computing what runtime.session(int8=True) computes; --target tensorrt keeps int8 with zero
    point 0, the graph runtime.quant.qdq_model builds."""
    import onnxruntime as ort

    paths = {}
    for target in ("onnxruntime", "tensorrt"):
        paths[target] = tmp_path / f"{target}.onnx"
        flags = ["--int8", "--json"] + ([] if target == "onnxruntime" else ["--target", target])
        assert runtime_cli.main(["export", str(calibrated), "--onnx", str(paths[target]),
                                 *flags]) == 0
        assert json.loads(capsys.readouterr().out)["target"] == target
    ours, trt = (onnx.load(str(paths[t])) for t in ("onnxruntime", "tensorrt"))
    assert _zero_point_types(ours) == {onnx.TensorProto.UINT8}
    assert _zero_point_types(trt) == {onnx.TensorProto.INT8}
    used = {i for n in ours.graph.node for i in n.input}
    assert all(t.name in used for t in ours.graph.initializer)  # no int8 zero point left over
    pack = quant.load_int8(calibrated)
    assert trt.graph == quant.qdq_model(pack, pack.act_scales).graph

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(paths["onnxruntime"]), options,
                                 providers=["CPUExecutionProvider"])
    ops = quant.graph_types(onnx.load(str(tmp_path / "optimized.onnx")))
    assert ops.get("QLinearConv", 0) >= 19 and "Conv" not in ops, ops
    x = torch.randn(8, 3, 32, 32).numpy()
    ours_out = plain.run(None, {plain.get_inputs()[0].name: x})[0]
    sess = runtime.session(calibrated, int8=True, providers=["CPUExecutionProvider"], threads=1)
    assert np.array_equal(sess.run(None, {sess.input_name: x})[0], ours_out)


def test_target_needs_int8(calibrated: Path, tmp_path: Path, capsys) -> None:
    assert runtime_cli.main(["export", str(calibrated), "--onnx", str(tmp_path / "m.onnx"),
                             "--target", "tensorrt"]) == 2
    assert "--int8" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
