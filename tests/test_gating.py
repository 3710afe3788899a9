"""Channel gating in the runtime (FBS, feature "channel_gating"): the saliency, top-k and
boosting rules by hand, where the mask applies, MAC counting, the channel-skipping path,
torch vs ONNX, and files that readers must refuse."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch
from torch import nn

import runtime
from packer import index_builder
from packer.encode import DataSection, Encoder
from packer.writer import layout
from runtime import loader, quant, zoo
from runtime.errors import ArchitectureError, FormatError, LimitExceeded, UnsupportedVersion
from runtime.format import features, preamble
from runtime.format.generated.weightpack.fb import ChannelGate as FbGate, Model as FbModel
from runtime.format.index import parse_index
from runtime.format.preamble import FLAG_INDEX_ZSTD, FLAG_REQUIRED_FEATURES, INDEX_IDENTIFIER
from runtime.format.reader import open_packed
from runtime.format.records import ArchitectureRecord, ChannelGateRecord, ModelRecord
from runtime.gating import (
    ChannelGate,
    LiveInputConv,
    MacCounter,
    SkipConv,
    apply_gates,
    gates_of,
    inference_graph,
    keep_count,
    keep_top_k,
    saliency,
)
from runtime.tensors import RawTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.packing import CIFAR_SPEC

torch.set_num_threads(1)

BLOCK_CONVS = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]


def earlier(c: int) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool).tril(-1)


def kept(s: list[float], k: int) -> list[int]:
    mask = keep_top_k(torch.tensor([s]), k, earlier(len(s)))[0]
    return torch.nonzero(mask).squeeze(1).tolist()


# --- the rules by hand ------------------------------------------------------------------------


def test_saliency_is_abs_of_linear_of_mean_abs_by_hand() -> None:
    x = torch.tensor([[[[1.0, -3.0], [2.0, -2.0]],     # mean |x| = 2
                       [[0.0, 0.0], [0.0, -4.0]]]])    # mean |x| = 1
    w = torch.tensor([[1.0, -5.0], [0.5, 0.5], [-1.0, 0.0]])
    b = torch.tensor([0.0, -2.0, 0.25])
    # [2 - 5, 1 + 0.5 - 2, -2 + 0.25] = [-3, -0.5, -1.75] -> abs
    assert saliency(x, w, b).tolist() == [[3.0, 0.5, 1.75]]


def test_top_k_keeps_exactly_k_and_ties_go_to_the_lower_channel() -> None:
    assert kept([1, 4, 3, 2], 2) == [1, 2]
    assert kept([1, 3, 3, 2], 2) == [1, 2]
    assert kept([3, 1, 3, 3], 2) == [0, 2]          # three tied for two places
    assert kept([2, 2, 2, 2], 3) == [0, 1, 2]
    assert kept([0, 0, 5, 0], 2) == [0, 2]
    assert kept([1, 4, 3, 2], 4) == [0, 1, 2, 3]
    # The reference thresholds at the k-th largest with a strict ">": k - 1 survive.
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    threshold = s.topk(2, dim=1).values[:, -1:]
    assert int((s > threshold).sum()) == 1


def test_kept_channels_are_boosted_by_their_saliency() -> None:
    gate = ChannelGate(2, 4, keep=2)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-0.5, 0.0]]))
        gate.bias.zero_()
    x = torch.ones(1, 2, 3, 3)
    x[:, 1] *= -2  # pooled = [1, 2]: s = [1, 2, 3, 0.5]
    mask = gate.eval()(x)
    assert mask.shape == (1, 4, 1, 1)
    assert mask.flatten().tolist() == [0.0, 2.0, 3.0, 0.0]


def test_keep_count_rounds_half_to_even_and_keeps_at_least_one() -> None:
    assert keep_count(16, 0.5) == 8 and keep_count(64, 0.3) == 19 and keep_count(32, 0.7) == 22
    assert keep_count(10, 0.25) == 2 and keep_count(10, 0.35) == 4  # 2.5 -> 2, 3.5 -> 4
    assert keep_count(16, 0.01) == 1 and keep_count(16, 1.0) == 16


# --- where the gate goes ----------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.conv2(out))
        return self.linear(out.mean(dim=(2, 3)))


def _tiny_trained_bn() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_the_mask_multiplies_the_batchnorm_output_so_suppressed_channels_are_zero() -> None:
    model = _tiny_trained_bn()
    reference = Tiny().eval()
    reference.load_state_dict(model.state_dict())
    gated = apply_gates(model, [ChannelGateRecord("conv1", 2), ChannelGateRecord("conv2", 3)],
                        torch.Generator().manual_seed(1))
    assert gated is not model  # the root calls conv1: the root itself is rewritten
    assert set(gated.state_dict()) == set(reference.state_dict()) | {
        "conv1.gate.weight", "conv1.gate.bias", "conv2.gate.weight", "conv2.gate.bias"}
    gates = gates_of(gated)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        m1 = gates["conv1"](x)
        h = torch.relu(reference.bn1(reference.conv1(x)) * m1)  # after BatchNorm, before ReLU
        m2 = gates["conv2"](h)
        h2 = torch.relu(reference.conv2(h) * m2)  # no BatchNorm: the conv output itself
        expected = reference.linear(h2.mean(dim=(2, 3)))
        assert torch.allclose(gated(x), expected, atol=1e-6)
        assert ((m1 != 0).sum(dim=1) == 2).all() and ((m2 != 0).sum(dim=1) == 3).all()
        suppressed = (m1 == 0).expand_as(h)
        assert (h[suppressed] == 0).all()


def test_resnet20_blocks_are_rewritten_in_place_with_every_name_kept() -> None:
    model = cifar_resnet20().eval()
    names = set(model.state_dict())
    gated = apply_gates(model, [ChannelGateRecord(n, 4) for n in BLOCK_CONVS])
    assert gated is model and isinstance(gated.layer2[1].conv1, nn.Conv2d)
    assert set(gated.state_dict()) == names | {f"{n}.gate.{p}" for n in BLOCK_CONVS
                                               for p in ("weight", "bias")}
    assert len(gates_of(gated)) == 18


@pytest.mark.parametrize(("gate", "message"), [
    (ChannelGateRecord("linear", 2), "a Linear: only convolutions"),
    (ChannelGateRecord("layer9.conv", 2), "does not have"),
    (ChannelGateRecord("", 2), "does not have"),
    (ChannelGateRecord("layer1.0.conv1", 0), "keeps 0 of 16"),
    (ChannelGateRecord("layer1.0.conv1", 17), "keeps 17 of 16"),
])
def test_gates_the_architecture_cannot_take_are_refused(gate, message) -> None:
    with pytest.raises(ArchitectureError, match=message):
        apply_gates(cifar_resnet20(), [gate])


def test_grouped_and_twice_gated_convolutions_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ArchitectureError, match="grouped"):
        apply_gates(model, [ChannelGateRecord("0", 2)])
    with pytest.raises(ArchitectureError, match="gated twice"):
        apply_gates(cifar_resnet20(), [ChannelGateRecord("layer1.0.conv1", 2)] * 2)


# --- MACs and the channel-skipping path -------------------------------------------------------


def test_mac_count_on_a_tiny_model_by_hand() -> None:
    model = _tiny_trained_bn()
    with torch.no_grad():
        model.conv1.weight[0].zero_()  # channel 0 of conv1 ...
        model.bn1.bias[0] = -10.0       # ... is negative after BatchNorm: zero after ReLU
        model.bn1.running_mean[0] = 0.0
    gated = apply_gates(model, [ChannelGateRecord("conv2", 2)])
    x = torch.randn(3, 3, 5, 5)
    with MacCounter(gated) as counter, torch.no_grad():
        gated(x)
    conv1, conv2, linear = 4 * 3 * 9 * 25, 6 * 4 * 9 * 25, 6 * 2
    summary = counter.summary()
    assert summary["macs_dense"] == conv1 + conv2 + linear
    # conv2: 2 kept outputs x 3 live inputs x 9 x 25 pixels, plus its 4 x 6 predictor.
    executed = conv1 + (2 * 3 * 9 * 25 + 4 * 6) + linear
    assert summary["macs_executed"] == executed and summary["macs_images"] == 3
    assert summary["macs_gates"] == 24 and summary["gated_layers"] == 1
    assert summary["gate_other_ops"] == 4 * 25 + 6 * 6
    assert counter.per_image().tolist() == [executed] * 3
    layer = counter.gated_layers()["conv2"]
    assert torch.cat(layer.kept).tolist() == [2] * 3
    assert torch.cat(layer.live_inputs).tolist() == [3] * 3


def test_an_ungated_conv_after_a_gated_one_counts_only_its_live_inputs() -> None:
    model = _tiny_trained_bn()
    gated = apply_gates(model, [ChannelGateRecord("conv1", 2)])
    x = torch.randn(3, 3, 5, 5)
    with MacCounter(gated) as counter, torch.no_grad():
        gated(x)
    conv2 = counter.layers["conv2"]
    live = torch.cat(conv2.live_inputs)
    # conv1 keeps 2 of its 4 channels per image: conv2 reads at most those 2.
    assert int(live.min()) >= 1 and int(live.max()) <= 2
    assert torch.cat(conv2.per_image).tolist() == [6 * int(n) * 9 * 25 for n in live]
    assert conv2.dense == 6 * 4 * 9 * 25
    conv1 = 2 * 3 * 9 * 25 + 3 * 4
    assert counter.per_image().tolist() == [conv1 + 6 * int(n) * 9 * 25 + 6 * 2 for n in live]


def _gated_resnet20(keep_ratio: float = 0.5, seed: int = 0,
                    gates: list[str] = BLOCK_CONVS) -> nn.Module:
    torch.manual_seed(seed)
    model = cifar_resnet20()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    records = [ChannelGateRecord(n, keep_count(model.get_submodule(n).out_channels, keep_ratio))
               for n in gates]
    return apply_gates(model, records, torch.Generator().manual_seed(seed)).eval()


def test_skip_path_computes_what_the_masked_model_computes() -> None:
    model = _gated_resnet20()
    skipping = inference_graph(model, skip=True)
    folded = inference_graph(model)
    assert sum(isinstance(m, SkipConv) for m in skipping.modules()) == 18
    assert not any(isinstance(m, nn.BatchNorm2d) for m in skipping.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(folded(x), expected, atol=1e-4)
        assert torch.allclose(skipping(x), expected, atol=1e-4)
        assert torch.allclose(skipping(x[:1]), expected[:1], atol=1e-4)
    with MacCounter(model) as counter, torch.no_grad():
        model(x)
    with MacCounter(skipping) as skip_counter, torch.no_grad():
        skipping(x)
    assert skip_counter.summary() == counter.summary()
    # conv2 of every block reads a gated, ReLU'd input: at most k of C channels are live.
    for name, layer in counter.gated_layers().items():
        if name.endswith("conv2"):
            assert max(torch.cat(layer.live_inputs).tolist()) <= layer.kept[0][0]
    assert counter.summary()["macs_ratio"] < 0.5


def test_skip_path_with_gates_on_each_blocks_first_conv_only() -> None:
    """conv2 is plain: the skipping path reads only the channels conv1 kept, and counts
    (and computes) what the masked model does."""
    model = _gated_resnet20(gates=[n for n in BLOCK_CONVS if n.endswith("conv1")])
    skipping = inference_graph(model, skip=True)
    assert sum(isinstance(m, SkipConv) for m in skipping.modules()) == 9
    assert sum(type(m) is LiveInputConv for m in skipping.modules()) == 10  # the stem, 9 conv2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(skipping(x), expected, atol=1e-4)
    with MacCounter(model) as counter, torch.no_grad():
        model(x)
    with MacCounter(skipping) as skip_counter, torch.no_grad():
        skipping(x)
    assert skip_counter.summary() == counter.summary()
    for name, layer in counter.layers.items():
        if name.endswith("conv2"):
            assert max(torch.cat(layer.live_inputs).tolist()) <= 8 * 2 ** int(name[5]) // 2
    assert 0.45 < counter.summary()["macs_ratio"] < 0.55  # about half: conv1 out, conv2 in


# --- files: the gating record, torch vs ONNX, refusals ----------------------------------------


def write(path: Path, model: nn.Module, gates: tuple[ChannelGateRecord, ...],
          **fields) -> bytes:
    data = DataSection(8)
    encoder = Encoder(data, "raw")
    records = tuple(encoder.tensor(n, RawTensor(t, t.dtype)).record
                    for n, t in model.state_dict().items())
    record = ModelRecord(
        producer="weightpack test", method="fbs", method_config_json="{}", source_sha256="",
        architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"), input=CIFAR_SPEC,
        num_classes=10, tensors=records, fp32_bytes=1, channel_gates=gates,
        **{"required_features": ("channel_gating",), **fields})
    blob = b"".join(layout(record, data).chunks)
    path.write_bytes(blob)
    return blob


@pytest.fixture(scope="module")
def gated_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    model = _gated_resnet20()
    gates = tuple(ChannelGateRecord(n, g.keep) for n, g in gates_of(model).items())
    path = tmp_path_factory.mktemp("gated") / "g.fb"
    write(path, model, gates)
    return path, model


def test_a_gated_file_is_format_1_2_and_loads_gating(gated_file) -> None:
    path, model = gated_file
    major, minor, flags = struct.unpack_from("<HHI", path.read_bytes(), 8)
    assert (major, minor) == (1, 2) and flags & FLAG_REQUIRED_FEATURES
    with open_packed(path) as packed:
        assert packed.model.required_features == ("channel_gating",)
        assert [g.module for g in packed.model.channel_gates] == BLOCK_CONVS
    loaded = runtime.load(path)
    assert len(gates_of(loaded)) == 18
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_torch_and_onnx_agree_in_fp32_and_int8(gated_file) -> None:
    path, model = gated_file
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    onnx_out = np.asarray(runtime.session(path, providers=["CPUExecutionProvider"])(x))
    assert np.abs(onnx_out - expected).max() < 1e-4
    graph = runtime.load(path, backend="onnx")
    ops = {n.op_type for n in graph.graph.node}
    assert {"Abs", "ReduceMean", "Gemm", "Greater", "Equal", "ReduceSum", "Less", "Mul"} <= ops
    scales = quant.calibrate(runtime.load(path), [(torch.randn(16, 3, 32, 32), None)])
    fake = quant.int8_model(path, scales, backend="torch")
    ort = quant.int8_model(path, scales, backend="onnx")
    with torch.no_grad():
        a = fake(x).numpy()
    b = np.asarray(ort(x))
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_readers_before_format_1_2_refuse_a_gated_file(gated_file, monkeypatch) -> None:
    path, _ = gated_file
    # A format 1.1 reader knows required features, but not this one.
    monkeypatch.delitem(features.FEATURES, "channel_gating")
    monkeypatch.setattr(features, "FORMAT_MINOR", 1)
    with pytest.raises(UnsupportedVersion, match="needs a weightpack that reads format 1.2 or "
                       "newer: feature 'channel_gating' is unknown to this one .it reads "
                       "format 1.1"):
        runtime.load(path)
    # A format 1.0 reader does not know preamble flag bit 1.
    monkeypatch.setattr(preamble, "KNOWN_FLAGS", FLAG_INDEX_ZSTD)
    with pytest.raises(UnsupportedVersion, match="needs a newer weightpack"):
        open_packed(path)


def test_gating_records_must_agree_with_the_file(tmp_path: Path, gated_file) -> None:
    _, model = gated_file
    gates = tuple(ChannelGateRecord(n, g.keep) for n, g in gates_of(model).items())
    write(tmp_path / "undeclared.fb", model, gates, required_features=())
    with pytest.raises(FormatError, match="channel gate records and the 'channel_gating'"):
        open_packed(tmp_path / "undeclared.fb")
    write(tmp_path / "twice.fb", model, gates + gates[:1])
    with pytest.raises(FormatError, match="same module"):
        open_packed(tmp_path / "twice.fb")
    write(tmp_path / "zero.fb", model, (replace(gates[0], keep=0), *gates[1:]))
    with pytest.raises(FormatError, match="keep >= 1"):
        open_packed(tmp_path / "zero.fb")
    write(tmp_path / "wide.fb", model, (replace(gates[0], keep=99), *gates[1:]))
    with pytest.raises(ArchitectureError, match="keeps 99 of 16"):
        runtime.load(tmp_path / "wide.fb")
    write(tmp_path / "missing.fb", model, gates[1:])  # a predictor the gates do not claim
    with pytest.raises(ArchitectureError, match="do not fit"):
        runtime.load(tmp_path / "missing.fb")


# --- hostile files: the gating record is bounded and checked before allocation --------------


def _gate_index(name: str, copies: int) -> bytes:
    """An index whose channel-gate list points `copies` times at one ChannelGate table."""
    b = flatbuffers.Builder(1 << 16)
    module = b.CreateString(name)
    FbGate.Start(b)
    FbGate.AddModule(b, module)
    FbGate.AddKeep(b, 1)
    gate = FbGate.End(b)
    FbModel.StartChannelGatesVector(b, copies)
    for _ in range(copies):
        b.PrependUOffsetTRelative(gate)
    vector = b.EndVector()
    arch = index_builder._architecture(b, ArchitectureRecord("builder", "cifar_resnet20", "{}"))
    spec = index_builder._input(b, CIFAR_SPEC)
    FbModel.Start(b)
    FbModel.AddArchitecture(b, arch)
    FbModel.AddInput(b, spec)
    FbModel.AddChannelGates(b, vector)
    b.Finish(FbModel.End(b), file_identifier=INDEX_IDENTIFIER)
    return bytes(b.Output())


def test_one_gate_table_referenced_many_times_is_refused_at_once() -> None:
    index = _gate_index("x" * 1000, 2000)
    assert len(index) < 12_000  # 2 MB of module names if each reference were read
    with pytest.raises(LimitExceeded,
                       match=r"at channel gate module\): .* referenced more than once"):
        parse_index(index)


def _refuse(*_args, **_kwargs):
    raise AssertionError("called before the file was checked")


@pytest.mark.parametrize("gate, message", [
    (ChannelGateRecord("fc", 1), "'fc', a Linear: only convolutions"),
    (ChannelGateRecord("layer4.2.conv3", 4096), "keeps 4096 of 2048 channels"),
    (ChannelGateRecord("layer4.2.conv3", 8), "do not fit"),  # predictor tensors missing
])
def test_gates_are_checked_on_the_skeleton_before_anything_is_allocated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: ChannelGateRecord,
        message: str) -> None:
    data = DataSection(8)
    record = ModelRecord(
        producer="weightpack test", method="fbs", method_config_json="{}", source_sha256="",
        architecture=ArchitectureRecord("builder", "torchvision.resnet50",
                                        '{"num_classes": 1000000}'),  # an 8 GB classifier
        input=CIFAR_SPEC, num_classes=10, fp32_bytes=1, channel_gates=(gate,),
        tensors=(Encoder(data, "raw").tensor("x", RawTensor(torch.zeros(4), torch.float32))
                 .record,), required_features=("channel_gating",))
    path = tmp_path / "hostile.fb"
    path.write_bytes(b"".join(layout(record, data).chunks))
    monkeypatch.setattr(zoo, "build", _refuse)  # a real build would allocate the model
    monkeypatch.setattr(loader, "decode_state_dict", _refuse)
    with pytest.raises(ArchitectureError, match=message):
        runtime.load(path)


def test_a_large_convs_predictor_is_a_meta_placeholder_in_the_skeleton() -> None:
    skeleton = apply_gates(zoo.build_skeleton("torchvision.resnet50", {}),
                           [ChannelGateRecord("layer4.2.conv3", 8)])
    gate = gates_of(skeleton)["layer4.2.conv3"]
    assert gate.weight.is_meta and gate.weight.shape == (2048, 512)
    assert not gate.earlier.is_meta  # the tie rule is not in the file: always real
