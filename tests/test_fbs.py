"""`fbs`: gate selection, the ratio schedule, chains with weight methods, training through
the shared loop (resumable, DDP), end-to-end packs of ResNet-20, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runtime
from packer.cli import main as packer_main
from packer.compress import PackRequest, pack
from packer.config import collect_settings
from packer.methods import resolve_method
from packer.methods.fbs import FBSMethod, select_gates, stage_ratios
from packer.training import DataSpec
from runtime.cli import main as runtime_main
from runtime.decode import decode_tensor
from runtime.errors import ConfigError, DataError
from runtime.format.reader import open_packed
from runtime.gating import gates_of
from runtime.tensors import RawTensor, ScalarCodebookTensor, UniformTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.ddp import run_two_ranks
from tests.packing import method_job

torch.set_num_threads(1)

BLOCK_CONVS = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]


def _r20(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"


def _config(*sets: str):
    return FBSMethod().build_config(collect_settings({}, list(sets)))


def test_stage_ratios_follow_the_reference_schedule() -> None:
    assert stage_ratios(0.5, 0.9, 0.2) == [0.9, 0.7, 0.5]
    assert stage_ratios(0.7, 0.9, 0.2) == [0.9, 0.7]
    assert stage_ratios(0.3, 0.9, 0.2) == [0.9, 0.7, 0.5, 0.3]
    assert stage_ratios(0.9, 0.9, 0.2) == [0.9] and stage_ratios(1.0, 0.9, 0.2) == [1.0]
    assert stage_ratios(0.4, 0.9, 0.25) == [0.9, 0.65, 0.4]


def test_default_gates_are_the_block_3x3_convs_and_globs_change_them() -> None:
    model = cifar_resnet20()
    assert select_gates(model, _config()) == BLOCK_CONVS  # not conv1, not the classifier
    assert select_gates(model, _config("layer3.*.gate=off")) == BLOCK_CONVS[:12]
    assert select_gates(model, _config("conv1.gate=on")) == ["conv1", *BLOCK_CONVS]
    downsample = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3)))
    named = nn.ModuleDict({"stem": downsample[0], "downsample": nn.Conv2d(8, 8, 1),
                           "body": downsample[1]})
    assert select_gates(named, _config()) == ["downsample", "body.0"]


@pytest.mark.parametrize(("sets", "message"), [
    (["linear.gate=on"], "linear is a Linear, not a convolution"),
    (["*.gate=on"], "linear is a Linear, not a convolution"),
    (["fc.gate=on"], "matches no convolution"),
    (["*.gate=off"], "no convolution is gated"),
])
def test_gating_what_is_not_a_convolution_is_refused(sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        select_gates(cifar_resnet20(), _config(*sets))


@pytest.mark.parametrize("setting", ["ratio=0", "ratio=1.5", "ratio=-0.2", "ratio_start=0"])
def test_ratio_outside_zero_one_is_refused(setting: str) -> None:
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        _config(setting)


@pytest.mark.parametrize(("name", "message"), [
    ("kmeans+fbs", "impossible chain order 'kmeans\\+fbs': fbs .structure. must come before"),
    ("int8+fbs", "impossible chain order"),
    ("fbs+pqf", "pqf cannot follow fbs, which changes the model's structure; methods that "
                "can: .*kmeans"),
    ("fbs+wfn", "wfn cannot follow fbs"),
    ("fbs+fbs", "both a structure stage"),
])
def test_impossible_chains_with_fbs_are_refused(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_method(name)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, shared_dir: Path,
                                                  capsys) -> None:
    out = tmp_path / "m.fb"
    for args in (["--method", "fbs", "--set", "ratio=1.5"],
                 ["--method", "kmeans+fbs"],
                 ["--method", "fbs", "--set", "linear.gate=on", "--set", "epochs=0"],
                 ["--method", "fbs", "--set", "epochs=1"]):
        code = packer_main(["compress", str(_r20(shared_dir)), "-o", str(out), *args])
        assert code == 2 and not out.exists(), args
    err = capsys.readouterr().err
    assert "ratio must be in (0, 1]" in err and "impossible chain order" in err
    assert "not a convolution" in err and "needs training data" in err


def test_a_model_stored_as_an_onnx_graph_cannot_be_gated(tmp_path: Path) -> None:
    scripted, out = tmp_path / "r20.ts", tmp_path / "x.fb"
    torch.jit.script(cifar_resnet20().eval()).save(str(scripted))
    for method in ("fbs", "fbs+kmeans"):
        with pytest.raises(ConfigError, match="channel gating .* ONNX graph"):
            pack(PackRequest(scripted, out, method=method, arch="graph",
                             input_size=(3, 32, 32), progress=False, overrides=["epochs=0"]))
    assert not out.exists()


# --- end to end on the shared ResNet-20 ---------------------------------------------------------


@pytest.fixture(scope="module")
def kmeans_file(shared_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fbs") / "fbs-kmeans.fb"
    report = pack(PackRequest(_r20(shared_dir), out, method="fbs+kmeans", progress=False,
                              overrides=["epochs=0", "ratio=0.5"]))
    return out, report


def test_epochs_zero_fbs_kmeans_packs_gates_and_codebooks_in_one_file(kmeans_file) -> None:
    out, report = kmeans_file
    assert report["format"] == "1.2" and report["required_features"] == ["channel_gating"]
    assert [s["ratio"] for s in report["fbs_schedule"]] == [0.9, 0.7, 0.5]
    assert report["fbs_gates"]["layer3.2.conv2"] == {"keep": 32, "channels": 64}
    with open_packed(out) as packed:
        gates = {g.module: g.keep for g in packed.model.channel_gates}
        forms = {t.name: decode_tensor(packed, t) for t in packed.model.tensors}
        fp32_bytes = packed.model.fp32_bytes
    assert list(gates) == BLOCK_CONVS and gates["layer1.0.conv1"] == 8
    for name in BLOCK_CONVS:  # convs and their predictors clustered, predictor biases raw
        assert isinstance(forms[f"{name}.weight"], ScalarCodebookTensor)
        assert isinstance(forms[f"{name}.gate.weight"], ScalarCodebookTensor)
        assert forms[f"{name}.gate.bias"].dequantize().shape == (forms[f"{name}.weight"]
                                                                   .shape[0],)
    assert fp32_bytes == 4 * sum(t.numel() for t in cifar_resnet20().state_dict().values()
                                 if t.is_floating_point())  # the source, predictors not counted
    model = runtime.load(out)
    assert len(gates_of(model)) == 18
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_same_seed_same_bytes_another_seed_other_predictors(kmeans_file, tmp_path: Path,
                                                            shared_dir: Path) -> None:
    out, _ = kmeans_file
    for seed, same in ((0, True), (1, False)):
        again = tmp_path / f"again{seed}.fb"
        pack(PackRequest(_r20(shared_dir), again, method="fbs+kmeans", progress=False,
                         overrides=["epochs=0", "ratio=0.5"], seed=seed))
        assert (again.read_bytes() == out.read_bytes()) is same


def test_fbs_kmeans_file_runs_the_same_in_torch_and_exported_onnx(kmeans_file, tmp_path: Path,
                                                                   capsys) -> None:
    import onnxruntime as ort

    out, _ = kmeans_file
    onnx_path = tmp_path / "m.onnx"
    assert runtime_main(["export", str(out), "--onnx", str(onnx_path)]) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = runtime.load(out)(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_calibrated_fbs_file_exports_int8_and_evaluates(tmp_path: Path, shared_dir: Path,
                                                        capsys) -> None:
    import onnxruntime as ort

    from runtime import quant

    out, onnx_path = tmp_path / "m.fb", tmp_path / "m.onnx"
    pack(PackRequest(_r20(shared_dir), out, method="fbs", progress=False,
                     overrides=["epochs=0"], calib_data=shared_dir / "data" / "cifar10" / "test",
                     calib_images=16, workers=0))
    with open_packed(out) as packed:
        labels = dict(packed.model.activation_scales)
    assert "layer1.0/mul" in labels and "layer1.0.conv2" in labels  # gated, then quantized
    assert runtime_main(["export", str(out), "--onnx", str(onnx_path), "--int8"]) == 0
    x = torch.randn(4, 3, 32, 32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = quant.int8_model(out, backend="torch")(x).numpy()
    assert (got.argmax(1) == expected.argmax(1)).all()
    capsys.readouterr()
    assert runtime_main(["eval", str(out), "--cifar10", str(shared_dir / "data" / "cifar10"),
                         "--int8", "--limit", "8", "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "int8" and "fp32 torch backend only" in result["macs_note"]


@pytest.mark.parametrize(("chain", "sets", "form"), [
    ("fbs+int8", (), UniformTensor),
    ("fbs+uniform", (), UniformTensor),
    # the int8 stage snaps the k-means codebook to the int8 grid and keeps the indices
    ("fbs+kmeans+int8", (), ScalarCodebookTensor),
    # a glob may name the predictors before fbs adds them: they stay raw
    ("fbs+kmeans", ("*.gate.method=none",), RawTensor),
])
def test_other_weight_chains_keep_the_gates(tmp_path: Path, shared_dir: Path, chain, sets,
                                            form) -> None:
    out = tmp_path / "m.fb"
    report = pack(PackRequest(_r20(shared_dir), out, method=chain, progress=False,
                              overrides=["epochs=0", "ratio=0.3", *sets]))
    assert report["required_features"] == ["channel_gating"]
    with open_packed(out) as packed:
        assert len(packed.model.channel_gates) == 18
        predictor = next(t for t in packed.model.tensors if t.name == "layer2.1.conv1.gate.weight")
        assert isinstance(decode_tensor(packed, predictor), form)
    assert {g.keep for g in gates_of(runtime.load(out)).values()} == {5, 10, 19}


def test_runtime_eval_json_reports_executed_macs(kmeans_file, shared_dir: Path,
                                                 capsys) -> None:
    out, _ = kmeans_file
    code = runtime_main(["eval", str(out), "--cifar10", str(shared_dir / "data" / "cifar10"),
                         "--limit", "40", "--batch-size", "20", "--workers", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["macs_dense"] == 40_551_040 and result["macs_images"] == 40
    assert result["gated_layers"] == 18 and result["macs_gates"] > 0
    # half the outputs of every gated conv, and conv2 reads at most half its inputs
    assert 0.2 < result["macs_ratio"] < 0.52
    assert result["macs_executed"] == pytest.approx(result["macs_ratio"] * result["macs_dense"],
                                                    rel=1e-5)


def test_a_plain_file_reports_dense_macs(tmp_path: Path, shared_dir: Path, capsys) -> None:
    out = tmp_path / "k.fb"
    pack(PackRequest(_r20(shared_dir), out, method="kmeans", progress=False))
    assert runtime_main(["eval", str(out), "--cifar10", str(shared_dir / "data" / "cifar10"),
                         "--limit", "8", "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["macs_executed"] == result["macs_dense"] == 40_551_040
    assert result["macs_ratio"] == 1.0 and result["gated_layers"] == 0


# --- training ---------------------------------------------------------------------------------


def test_training_a_couple_of_batches_per_stage_then_resuming(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=5, workers=0)
    prefix = tmp_path / "fbs"
    sets = ["epochs=1", "train_limit=10", "holdout=5", "lr=0.01", "l1=0.001",
            f"checkpoint={prefix}", "ratio=0.5", "distill=false"]
    torch.manual_seed(0)
    method, job = method_job(FBSMethod, cifar_resnet20(), *sets, data=data)
    before = {k: v.clone() for k, v in job.state_dict.items()}
    assert method.compress(job) == {}  # fbs compresses nothing itself
    schedule = method.extra_report()["fbs_schedule"]
    assert [s["ratio"] for s in schedule] == [0.9, 0.7, 0.5]
    assert [s["training"]["history"][0]["images"] for s in schedule] == [10, 10, 10]
    assert all(s["training"]["validated_on"] == "5 held-out train images" for s in schedule)
    assert sorted(p.name for p in tmp_path.glob("fbs.*")) == [
        "fbs.ratios-0.9-0.7-0.5.epochs-1-1-1", "fbs.ratios-0.9-0.7.epochs-1-1",
        "fbs.ratios-0.9.epochs-1"]
    # The job now holds the gated model: its predictors packed, their weights compressed
    # by a later stage, one gating record per conv at the final ratio.
    assert set(job.state_dict) == set(before) | {f"{n}.gate.{p}" for n in BLOCK_CONVS
                                                 for p in ("weight", "bias")}
    assert [f"{n}.gate.weight" for n in BLOCK_CONVS] == job.targets[-18:]
    assert [(g.module, g.keep) for g in job.channel_gates][:2] == [("layer1.0.conv1", 8),
                                                                    ("layer1.0.conv2", 8)]
    # Every stage trained the predictors and the network (the checkpoints hold the last
    # epoch; the packed model is each stage's best epoch by validation).
    first = torch.load(f"{prefix}.ratios-0.9.epochs-1", weights_only=True)["model"]
    last = torch.load(f"{prefix}.ratios-0.9-0.7-0.5.epochs-1-1-1", weights_only=True)["model"]
    assert not torch.equal(first["layer1.0.conv1.gate.weight"],
                           last["layer1.0.conv1.gate.weight"])
    assert not torch.equal(last["bn1.weight"], before["bn1.weight"])
    # A run with a longer schedule resumes the stages it shares and trains only the new one.
    torch.manual_seed(0)
    method2, job2 = method_job(FBSMethod, cifar_resnet20(), *sets[:-2], "ratio=0.3",
                               "distill=false", data=data)
    method2.compress(job2)
    schedule2 = method2.extra_report()["fbs_schedule"]
    assert [s["training"]["resumed_from"] for s in schedule2] == [1, 1, 1, 0]
    assert {g.keep for g in job2.channel_gates} == {5, 10, 19}
    # A longer last stage resumes the shared ones and keeps its own file beside the short one.
    method4, job4 = method_job(FBSMethod, cifar_resnet20(), *sets, "final_epochs=2", data=data)
    method4.compress(job4)
    schedule4 = method4.extra_report()["fbs_schedule"]
    assert [s["training"]["resumed_from"] for s in schedule4] == [1, 1, 0]
    assert [s["epochs"] for s in schedule4] == [1, 1, 2]
    assert (tmp_path / "fbs.ratios-0.9-0.7-0.5.epochs-1-1-2").exists()
    assert (tmp_path / "fbs.ratios-0.9-0.7-0.5.epochs-1-1-1").exists()
    # A stage trained under other settings (here the learning rate) is not resumed from.
    changed = [s for s in sets if not s.startswith("lr=")]
    method3, job3 = method_job(FBSMethod, cifar_resnet20(), *changed, "lr=0.02", data=data)
    with pytest.raises(ConfigError, match=r"cannot resume .*lr"):
        method3.compress(job3)


def test_training_needs_data(tmp_path: Path) -> None:
    method, job = method_job(FBSMethod, cifar_resnet20(), "epochs=2")
    with pytest.raises(DataError, match="needs training data"):
        method.compress(job)
    method, job = method_job(FBSMethod, cifar_resnet20(), "epochs=0", "final_epochs=1")
    with pytest.raises(DataError, match="needs training data"):
        method.compress(job)


def _ddp_worker(rank: int, out: str, root: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    data = DataSpec("cifar10", Path(root), batch_size=5, workers=0)
    method, job = method_job(FBSMethod, model, "epochs=1", "lr=0.01", "ratio=0.5",
                             "ratio_start=0.5", "distill=false", data=data)
    method.compress(job)
    history = method.extra_report()["fbs_schedule"][0]["training"]["history"]
    torch.save({"state": job.state_dict, "images": history[0]["images"],
                "gates": [(g.module, g.keep) for g in job.channel_gates]},
               f"{out}/rank{rank}.pt")


def test_two_process_ddp_trains_the_gated_model_identically(tmp_path: Path) -> None:
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path)
    assert r0["images"] == r1["images"] == 20 and r0["gates"] == r1["gates"] == [("3", 4)]
    assert "3.gate.weight" in r0["state"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


# --- calibrated predictor start -----------------------------------------------------------------


def test_gate_points_are_the_batchnorm_after_each_conv_else_the_conv() -> None:
    from runtime.gating import gate_points

    points = gate_points(cifar_resnet20(), ["layer1.0.conv1", "layer3.2.conv2"])
    assert points == {"layer1.0.conv1": "layer1.0.bn1", "layer3.2.conv2": "layer3.2.bn2"}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    assert gate_points(plain, ["0", "2"]) == {"0": "0", "2": "3"}


def test_calibrated_predictors_rank_by_response_and_start_near_one(shared_dir: Path) -> None:
    """The fit orders channels as their measured response does (on other images than it
    was fitted on), and at ratio 1 the gated model still computes the pretrained one."""
    from packer.methods.fbs.calibrate import fit_predictors
    from runtime.format.records import ChannelGateRecord
    from runtime.gating import apply_gates, gate_points

    model = cifar_resnet20()
    model.load_state_dict(torch.load(_r20(shared_dir), weights_only=True))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    fit_images = [torch.rand(32, 3, 32, 32, generator=generator) for _ in range(2)]
    fitted = fit_predictors(model, BLOCK_CONVS, fit_images, scale=0.01)
    name = "layer2.1.conv1"
    weight, bias = fitted[name]
    assert weight.shape == (32, 32) and bias.shape == (32,)

    test_images = torch.rand(16, 3, 32, 32, generator=generator)
    seen = {}
    conv = model.get_submodule(name)
    point = model.get_submodule(gate_points(model, [name])[name])
    hooks = [conv.register_forward_pre_hook(
                 lambda _m, a: seen.__setitem__("p", a[0].abs().mean((2, 3)))),
             point.register_forward_hook(
                 lambda _m, _a, out: seen.__setitem__("t", out.abs().mean((2, 3))))]
    with torch.no_grad():
        plain_out = model(test_images)
    for hook in hooks:
        hook.remove()
    saliency = (seen["p"] @ weight.T + bias).abs()
    assert (saliency - 1).abs().max() < 0.1  # boosting starts neutral

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(dim=1).argsort(dim=1).float()

    rs, rt = ranks(saliency), ranks(seen["t"])
    rs, rt = rs - rs.mean(1, keepdim=True), rt - rt.mean(1, keepdim=True)
    spearman = ((rs * rt).sum(1) / (rs.norm(dim=1) * rt.norm(dim=1))).mean()
    assert spearman > 0.7, spearman

    records = [ChannelGateRecord(n, model.get_submodule(n).out_channels) for n in BLOCK_CONVS]
    gated = apply_gates(model, records).eval()
    with torch.no_grad():
        for n, gate in gates_of(gated).items():
            gate.weight.copy_(fitted[n][0])
            gate.bias.copy_(fitted[n][1])
        gated_out = gated(test_images)
    assert (gated_out.argmax(1) == plain_out.argmax(1)).float().mean() >= 0.9


def test_calibrated_init_needs_data_and_auto_is_reference_without_training() -> None:
    method, job = method_job(FBSMethod, cifar_resnet20(), "epochs=0", "init=calibrated")
    with pytest.raises(DataError, match="init=calibrated fits the predictors"):
        method.compress(job)
    method, job = method_job(FBSMethod, cifar_resnet20(), "epochs=0")
    method.compress(job)
    assert method.extra_report()["fbs_init"] == "reference"
