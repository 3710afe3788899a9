"""ttq, bwn, dorefa: quantizer rules against hand-computed values, packing, training, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runtime
from packer.cli import main as packer_main
from packer.compress import PackRequest, pack
from packer.config import build_config
from packer.encode import DataSection, Encoder
from packer.methods import METHODS
from packer.methods.lowbit import BWNMethod, DoReFaMethod, TTQMethod
from packer.methods.lowbit.quantizers import (
    BinaryQuantizer,
    DoReFaQuantizer,
    Int8Quantizer,
    TernaryQuantizer,
    quantize_activation_ste,
)
from packer.training import DataSpec
from runtime import coders
from runtime.errors import ArchitectureError, ConfigError, DataError
from runtime.format.reader import open_packed
from runtime.tensors import ScalarCodebookTensor, UniformTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.ddp import run_two_ranks
from tests.packing import method_job

torch.set_num_threads(1)


def grads(quantizer: nn.Module, latent: torch.Tensor, upstream: torch.Tensor):
    """(forward value, d loss / d latent) for loss = sum(upstream * value)."""
    latent = latent.clone().requires_grad_(True)
    value = quantizer(latent)
    (value * upstream).sum().backward()
    return value.detach(), latent.grad


# --- TTQ ------------------------------------------------------------------------------------


def test_ttq_forward_and_the_papers_gradients_by_hand() -> None:
    latent = torch.tensor([0.8, -0.6, 0.05, -0.05, 0.3, -0.35, 1.0, 0.0])
    q = TernaryQuantizer(latent, threshold=0.2)  # delta = 0.2 * max|w| = 0.2
    # scales start at the mean magnitude above / below the threshold
    assert q.wp.item() == pytest.approx((0.8 + 0.3 + 1.0) / 3)
    assert q.wn.item() == pytest.approx((0.6 + 0.35) / 2)
    with torch.no_grad():
        q.wp.fill_(0.5)
        q.wn.fill_(0.25)
    g = torch.arange(1.0, 9.0)
    value, d_latent = grads(q, latent, g)
    assert value.tolist() == [0.5, -0.25, 0.0, 0.0, 0.5, -0.25, 0.5, 0.0]
    # dL/dW_p is the SUM over the positive set (the reference's mean would be 13 / 8) ...
    assert float(q.wp.grad) == pytest.approx(1 + 5 + 7)
    # ... and dL/dW_n is minus the sum over the negative set (the value there is -W_n).
    assert float(q.wn.grad) == pytest.approx(-(2 + 6))
    # Latent: W_p * g, g, W_n * g (W_n > 0: same sign as g; the reference flips it).
    expected = [0.5 * 1, 0.25 * 2, 3, 4, 0.5 * 5, 0.25 * 6, 0.5 * 7, 8]
    assert d_latent.tolist() == pytest.approx(expected)
    assert d_latent[1] > 0 and d_latent[5] > 0


def test_ttq_scale_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    latent = torch.randn(6, 4, 3, 3)
    q = TernaryQuantizer(latent, 0.05)
    target = torch.randn(6, 4, 3, 3)

    def loss() -> torch.Tensor:
        return ((q(latent) - target) ** 2).sum()

    loss().backward()
    for p in (q.wp, q.wn):
        with torch.no_grad():
            p += 1e-3
            up = float(loss())
            p -= 2e-3
            down = float(loss())
            p += 1e-3
        assert float(p.grad) == pytest.approx((up - down) / 2e-3, rel=1e-2)


# --- BWN ------------------------------------------------------------------------------------


def test_bwn_sign_scale_and_clipped_straight_through_by_hand() -> None:
    latent = torch.tensor([[0.3, -0.1, 0.0, 0.2], [-0.5, 0.1, 0.1, -0.1]])
    g = torch.ones_like(latent)
    value, d = grads(BinaryQuantizer(per_channel=False), latent, g)
    a = 1.4 / 8  # mean |w| of the layer; sign(0) = +1 keeps the layer binary
    assert value.flatten().tolist() == pytest.approx([a, -a, a, a, -a, a, a, -a])
    assert d.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]  # no gradient where |w| > alpha
    value, d = grads(BinaryQuantizer(per_channel=True), latent, g)
    a0, a1 = 0.6 / 4, 0.8 / 4  # BWN-F: one alpha per output filter
    assert value.flatten().tolist() == pytest.approx([a0, -a0, a0, a0, -a1, a1, a1, -a1])
    assert d.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]


# --- DoReFa ---------------------------------------------------------------------------------


def test_dorefa_two_bit_weights_by_hand() -> None:
    latent = torch.tensor([0.5, -0.25, 0.1, -1.0])
    value, d = grads(DoReFaQuantizer(2), latent, torch.ones(4))
    peak = math.tanh(1.0)
    codes = []
    for w in latent.tolist():
        normalised = math.tanh(w) / (2 * peak) + 0.5
        codes.append(2 * round(normalised * 3) - 3)
    assert codes == [1, -1, 1, -3]
    assert value.tolist() == pytest.approx([c * peak / 3 for c in codes])
    # straight through the rounding: d/dw of s * (2 w_n - 1) = 1 - tanh(w)^2 (s cancels)
    assert d.tolist() == pytest.approx([1 - math.tanh(w) ** 2 for w in latent.tolist()],
                                       rel=1e-5)


def test_dorefa_one_bit_is_sign_times_mean_with_plain_straight_through() -> None:
    method, job = method_job(DoReFaMethod, nn.Linear(4, 2), "bits_w=1")
    q = method.low_quantizer(torch.zeros(1), job.config.options)
    latent = torch.tensor([0.5, -0.25, 0.1, -1.0])
    value, d = grads(q, latent, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m = (0.5 + 0.25 + 0.1 + 1.0) / 4
    assert value.tolist() == pytest.approx([m, -m, m, -m])
    assert d.tolist() == [1.0, 2.0, 3.0, 4.0]  # no clipping


def test_activation_quantization_clips_to_unit_interval_by_hand() -> None:
    x = torch.tensor([-0.5, 0.0, 0.2, 0.49, 0.51, 1.0, 1.7], requires_grad=True)
    y = quantize_activation_ste(x, 2, 1.0)
    assert y.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # zero outside [0, 1], straight inside
    assert quantize_activation_ste(x, 1, 1.0).tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert quantize_activation_ste(x.detach() * 2, 1, 2.0).tolist() == [0, 0, 0, 0, 2, 2, 2]


# --- packed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer, form", [
    (lambda w: TernaryQuantizer(w, 0.05), ScalarCodebookTensor),
    (lambda w: BinaryQuantizer(per_channel=False), ScalarCodebookTensor),
    (lambda w: BinaryQuantizer(per_channel=True), UniformTensor),
    (lambda w: BinaryQuantizer(per_channel=True, half_scales=True), UniformTensor),
    (lambda w: DoReFaQuantizer(3), UniformTensor),
    (lambda w: DoReFaQuantizer(8), UniformTensor),
    (lambda w: Int8Quantizer(), UniformTensor),
])
def test_packed_form_decodes_to_the_trained_value_bit_for_bit(quantizer, form) -> None:
    torch.manual_seed(1)
    latent = torch.randn(16, 8, 3, 3) * 0.1
    q = quantizer(latent)
    packed = q.compress(latent)
    assert isinstance(packed, form)
    assert torch.equal(packed.dequantize(), q(latent).detach())
    if isinstance(packed, ScalarCodebookTensor):
        assert packed.codebook.numel() == (3 if isinstance(q, TernaryQuantizer) else 2)


def test_ternary_layer_with_sixty_percent_zeros_codes_well_under_log2_3() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.2, 0.6, 0.2])  # -W_n, 0, +W_p
    indices = torch.multinomial(probs, 64 * 64 * 9, replacement=True, generator=g)
    tensor = ScalarCodebookTensor(torch.tensor([-0.1, 0.0, 0.1]), indices.reshape(64, 64, 3, 3))
    encoded = Encoder(DataSection(8)).tensor("w", tensor)
    stream = encoded.streams[0]
    bits = 8 * (stream.coded_bytes + encoded.record.codebook.blob.length) / indices.numel()
    entropy = -float((probs * probs.log2()).sum())  # 1.371
    # auto may keep a fast coder within its margin of the smallest (runtime.coders.pick)
    slack = 1 + coders.SLOW_MARGIN_PERCENT / 100
    assert bits < (entropy + 0.02) * slack < math.log2(3) - 0.15, (stream.coder, bits)


# --- methods end to end ---------------------------------------------------------------------


def _r20(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"


@pytest.mark.parametrize("method, sets, low_form, bits_max", [
    ("ttq", ["threshold=0.15"], ScalarCodebookTensor, 1.35),
    ("bwn", [], ScalarCodebookTensor, 1.02),
    ("bwn", ["granularity=channel"], UniformTensor, 1.12),
    ("dorefa", ["bits_w=2"], UniformTensor, 2.0),
])
def test_epochs_zero_packs_resnet20_with_int8_edges(tmp_path: Path, shared_dir: Path, method,
                                                    sets, low_form, bits_max) -> None:
    out = tmp_path / "m.fb"
    report = pack(PackRequest(_r20(shared_dir), out, method=method, progress=False,
                              overrides=["epochs=0", *sets]))
    assert report["format"] == "1.0" and not report["required_features"]
    from runtime.decode import decode_tensor

    with open_packed(out) as packed:
        forms = {t.name: decode_tensor(packed, t) for t in packed.model.tensors}
    for edge in ("conv1.weight", "linear.weight"):
        assert isinstance(forms[edge], UniformTensor) and forms[edge].bits == 8
    lowbit = report[f"{method}_layers"]
    assert len(report["lowbit_weights"]) == 18  # conv1, 18 block convs, linear: less edges
    assert all(isinstance(forms[n], low_form) for n in report["lowbit_weights"])
    rows = {r["name"]: r for r in report["tensors"]}
    low = [rows[n] for n in report["lowbit_weights"]]
    bits = 8 * sum(r["coded_bytes"] for r in low) / sum(r["numel"] for r in low)
    assert bits < bits_max
    assert lowbit["layer1.0.conv1"]["precision"] == "low"
    model = runtime.load(out)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bwn_f_with_fp16_stores_half_scales_behind_their_feature(tmp_path: Path,
                                                                 shared_dir: Path) -> None:
    from runtime.decode import decode_tensor

    files, reports = {}, {}
    for fp16 in (False, True):
        files[fp16] = tmp_path / f"fp16-{fp16}.fb"
        reports[fp16] = pack(PackRequest(_r20(shared_dir), files[fp16], method="bwn",
                                         progress=False, overrides=[
                                             "epochs=0", "granularity=channel",
                                             f"fp16={str(fp16).lower()}"]))
    assert reports[True]["format"] == "1.3"
    assert reports[True]["required_features"] == ["half_scales"]
    assert reports[False]["format"] == "1.0" and not reports[False]["required_features"]
    name = "layer2.1.conv1.weight"
    with open_packed(files[True]) as packed:
        record = next(t for t in packed.model.tensors if t.name == name)
        assert record.scales.dtype == "float16" and record.scales.blob.length == 2 * 32
        half = decode_tensor(packed, record)
    with open_packed(files[False]) as packed:
        full = decode_tensor(packed, next(t for t in packed.model.tensors if t.name == name))
    # The same signs; the scales are the float32 ones rounded to float16, widened exactly.
    assert torch.equal(half.codes, full.codes) and half.scales.dtype == torch.float32
    assert torch.equal(half.scales, full.scales.half().float())
    rows = [{r["name"]: r for r in reports[f]["tensors"]} for f in (False, True)]
    low = reports[True]["lowbit_weights"]
    channels = sum(rows[1][n]["shape"][0] for n in low)
    saved = sum(rows[0][n]["coded_bytes"] - rows[1][n]["coded_bytes"] for n in low)
    assert saved == 2 * channels  # 2 bytes per output channel, nothing else changes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(runtime.load(files[True])(x), runtime.load(files[False])(x),
                               rtol=2e-3, atol=2e-3)


def test_edges_and_per_layer_precision_by_glob(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "m.fb"
    report = pack(PackRequest(_r20(shared_dir), out, method="ttq", progress=False, overrides=[
        "epochs=0", "edges=fp32", "layer3.*.precision=int8", "layer1.0.conv1.precision=fp32"]))
    plan = report["ttq_plan"]
    assert plan["conv1"] == plan["linear"] == "fp32" == plan["layer1.0.conv1"]
    assert plan["layer3.1.conv2"] == "int8" and plan["layer2.0.conv1"] == "low"
    schemes = {r["name"]: r["scheme"] for r in report["tensors"]}
    assert schemes["conv1.weight"] == schemes["layer1.0.conv1.weight"] == "raw"
    assert schemes["layer3.1.conv2.weight"] == "uniform"
    assert schemes["layer2.0.conv1.weight"] == "scalar_codebook"


def test_training_a_couple_of_batches_then_resuming(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=5, workers=0)
    ckpt = tmp_path / "ttq.pt"
    sets = ["epochs=2", "train_limit=10", "holdout=5", "bn_recalibration=10", "lr=0.01",
            f"checkpoint={ckpt}"]
    torch.manual_seed(0)
    model = cifar_resnet20()
    method, job = method_job(TTQMethod, model, *sets, data=data)
    before = {k: v.clone() for k, v in job.state_dict.items()}
    out = method.compress(job)
    training = method.extra_report()["ttq_training"]
    assert training["epochs_run"] == 2 and ckpt.is_file()
    assert training["validated_on"] == "5 held-out train images"
    assert "cosine" in training["schedule"]
    assert [h["images"] for h in training["history"]] == [10, 10]
    # Latent weights, scales and BatchNorm trained (the checkpoint holds the last epoch; the
    # packed model is the best epoch by validation, which may be the start).
    last = torch.load(ckpt, weights_only=True)["model"]
    assert not torch.equal(last["bn1.weight"], before["bn1.weight"])
    assert "layer2.0.conv1.weight_quantizer.wp" in last and "layer2.0.conv1.latent_weight" in last
    assert set(job.state_dict) == set(before)
    for name, tensor in out.items():
        assert torch.equal(tensor.dequantize(), job.state_dict[name])
    # A second run finds the finished checkpoint, trains no more, and packs the same weights.
    torch.manual_seed(0)
    method2, job2 = method_job(TTQMethod, cifar_resnet20(), *sets, data=data)
    out2 = method2.compress(job2)
    assert method2.extra_report()["ttq_training"]["resumed_from"] == 2
    best = training["best_epoch"]
    if best == method2.extra_report()["ttq_training"]["best_epoch"]:
        assert all(torch.equal(out2[k].dequantize(), out[k].dequantize()) for k in out)


def test_lr_schedule_is_cosine_per_batch_and_reaches_lr_min(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=5, workers=0)
    seen: list[float] = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    method, job = method_job(BWNMethod, cifar_resnet20(), "epochs=2", "train_limit=10",
                             "lr=0.004", "lr_min=0.001", "bn_recalibration=0", "distill=false",
                             data=data)
    torch.optim.Adam.step = spy  # type: ignore[method-assign]
    try:
        method.compress(job)
    finally:
        torch.optim.Adam.step = real_step  # type: ignore[method-assign]
    steps = len(seen)
    assert steps == 4  # 2 epochs x 2 batches, no crash after the first epoch
    expected = [0.001 + 0.003 * (1 + math.cos(math.pi * i / steps)) / 2 for i in range(steps)]
    assert seen == pytest.approx(expected)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, setting", [
    ("dorefa", "bits_w=0"), ("dorefa", "bits_w=9"), ("dorefa", "bits_a=9"),
    ("dorefa", "layer1.*.bits_a=0"),
])
def test_bits_outside_one_to_eight_are_refused(method: str, setting: str) -> None:
    with pytest.raises(ConfigError, match="between 1 and 8"):
        build_config(method, METHODS[method].options, {}, [setting])


def test_cli_bad_bits_exit_2_without_output(tmp_path: Path, shared_dir: Path, capsys) -> None:
    out = tmp_path / "x.fb"
    code = packer_main(["compress", "--method", "dorefa", str(_r20(shared_dir)), "-o", str(out),
                        "--set", "bits_w=12"])
    err = capsys.readouterr().err
    assert code == 2 and "bits_w must be between 1 and 8" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_activation_quantization_for_paths_that_cannot_apply_it(tmp_path: Path,
                                                               shared_dir: Path) -> None:
    out = tmp_path / "x.fb"
    with pytest.raises(ConfigError, match="int8"):
        pack(PackRequest(_r20(shared_dir), out, method="dorefa", progress=False,
                         overrides=["epochs=0", "bits_a=4"], calib_data=tmp_path))
    assert not out.exists()
    scripted = tmp_path / "r20.ts"
    torch.jit.script(cifar_resnet20().eval()).save(str(scripted))
    with pytest.raises(ConfigError, match="ONNX graph"):
        pack(PackRequest(scripted, out, method="dorefa", arch="graph", input_size=(3, 32, 32),
                         progress=False, overrides=["epochs=0", "layer1.*.bits_a=4"]))
    with pytest.raises(ConfigError, match="TorchScript"):
        pack(PackRequest(scripted, out, method="ttq", arch="graph", input_size=(3, 32, 32),
                         progress=False, overrides=["epochs=0"]))
    assert not out.exists()


def test_mismatched_checkpoints_are_clear(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "x.fb"
    with pytest.raises(ArchitectureError, match="does not match architecture cifar_resnet32"):
        pack(PackRequest(_r20(shared_dir), out, method="ttq", arch="cifar_resnet32",
                         progress=False, overrides=["epochs=0"]))
    # A training checkpoint written for another model is not resumed from.
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=5, workers=0)
    ckpt = tmp_path / "other.pt"
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.LazyLinear(10))
    small(torch.zeros(1, 3, 32, 32))
    sets = ["epochs=1", "train_limit=5", "bn_recalibration=0", f"checkpoint={ckpt}"]
    method, job = method_job(BWNMethod, small, *sets, data=data)
    method.compress(job)
    method, job = method_job(BWNMethod, cifar_resnet20(), *sets, data=data)
    with pytest.raises(ConfigError, match="another model"):
        method.compress(job)
    assert not out.exists()


def test_training_needs_data_and_a_low_bit_layer() -> None:
    method, job = method_job(TTQMethod, cifar_resnet20(), "epochs=3")
    with pytest.raises(DataError, match="epochs=0"):
        method.compress(job)
    method, job = method_job(TTQMethod, nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
                             "epochs=0")
    with pytest.raises(ConfigError, match="no layer is left"):
        method.compress(job)  # a single layer is both first and last: int8, nothing low-bit
    assert METHODS["ttq"] is TTQMethod and METHODS["bwn"] is BWNMethod


def test_resnet20_dorefa_activations_agree_between_torch_and_onnx(tmp_path: Path,
                                                                 shared_dir: Path) -> None:
    out = tmp_path / "m.fb"
    report = pack(PackRequest(_r20(shared_dir), out, method="dorefa", progress=False,
                              overrides=["epochs=0", "bits_w=2", "bits_a=2"]))
    assert report["format"] == "1.1" and report["required_features"] == ["activation_quant"]
    quantized = {q["module"] for q in report["activation_quant"]}
    assert len(quantized) == 18 and "conv1" not in quantized and "linear" not in quantized
    assert all(q["bits"] == 2 and q["clip"] == 1.0 for q in report["activation_quant"])
    model = runtime.load(out)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x)
    # The stored activation quantizers change the outputs: they are really applied.
    plain = runtime.load(out)
    for m in plain.modules():
        m._forward_pre_hooks.clear()
    with torch.inference_mode():
        assert not torch.allclose(plain(x), want, atol=1e-3)
    graph = runtime.load(out, backend="onnx")
    assert {"Clip", "Round", "Mul", "Div"} <= {n.op_type for n in graph.graph.node}
    got = runtime.session(out, providers=["CPUExecutionProvider"])(x.numpy())
    assert np.allclose(got, want.numpy(), atol=1e-4)
    assert (got.argmax(1) == want.numpy().argmax(1)).all()


def _ddp_worker(rank: int, out: str, data_root: str) -> None:
    data = DataSpec("cifar10", Path(data_root), batch_size=5, workers=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    method, job = method_job(TTQMethod, model, "epochs=1", "bn_recalibration=10",
                             "lr=0.01", "distill=false", data=data)
    packed = {k: t.dequantize() for k, t in method.compress(job).items()}
    history = method.extra_report()["ttq_training"]["history"]
    torch.save({"tensors": packed, "images": history[0]["images"]}, f"{out}/rank{rank}.pt")


def test_two_process_ddp_trains_identically_on_both_ranks(tmp_path: Path) -> None:
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path)
    assert r0["images"] == r1["images"] == 20  # each rank trained on its half, summed
    assert set(r0["tensors"]) == {"0.weight", "3.weight", "8.weight"}
    for k in r0["tensors"]:
        assert torch.equal(r0["tensors"][k], r1["tensors"][k]), k


def test_lowbit_methods_take_training_data() -> None:
    # `trains` decides whether --cifar10 is used or warned about as class names only.
    assert all(METHODS[name].trains for name in ("ttq", "bwn", "dorefa"))
