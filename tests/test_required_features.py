"""Required features (format 1.1): files that need more than decoded weights are refused by
readers that cannot provide it, old and new; activation quantization is the first feature."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import runtime
from packer.encode import DataSection, Encoder
from packer.writer import layout
from runtime import quant
from runtime.errors import ArchitectureError, FormatError, UnsupportedVersion
from runtime.format import features, preamble
from runtime.format.preamble import FLAG_INDEX_ZSTD, FLAG_REQUIRED_FEATURES
from runtime.format.reader import open_packed
from runtime.format.records import ActivationQuantRecord, ArchitectureRecord, ModelRecord
from runtime.quant import QuantError
from runtime.tensors import RawTensor, UniformTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.packing import CIFAR_SPEC

QUANTIZED = (ActivationQuantRecord("layer1.0.conv2", 2, 1.0),
             ActivationQuantRecord("layer3.2.conv1", 4, 0.5))


def write(path: Path, **fields) -> bytes:
    """A ResNet-20 file (raw weights) with `fields` set on its ModelRecord."""
    data = DataSection(8)
    encoder = Encoder(data, "raw")
    state = cifar_resnet20().state_dict()
    records = tuple(encoder.tensor(n, RawTensor(t, t.dtype)).record for n, t in state.items())
    model = ModelRecord(
        producer="weightpack test", method="test", method_config_json="{}", source_sha256="",
        architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"), input=CIFAR_SPEC,
        num_classes=10, tensors=records, fp32_bytes=1, **fields)
    blob = b"".join(layout(model, data).chunks)
    path.write_bytes(blob)
    return blob


def restamp(blob: bytes, minor: int | None = None, flags: int | None = None) -> bytes:
    """The same file with another preamble minor version or flags."""
    head = bytearray(blob[:64])
    if minor is not None:
        struct.pack_into("<H", head, 10, minor)
    if flags is not None:
        struct.pack_into("<I", head, 12, flags)
    return bytes(head) + blob[64:]


def test_files_with_features_are_format_1_1_and_flagged(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.fb")
    assert struct.unpack_from("<HHI", plain, 8) == (1, 0, FLAG_INDEX_ZSTD)  # unchanged
    blob = write(tmp_path / "aq.fb", required_features=("activation_quant",),
                 activation_quant=QUANTIZED)
    major, minor, flags = struct.unpack_from("<HHI", blob, 8)
    assert (major, minor) == (1, 1) and flags & FLAG_REQUIRED_FEATURES
    with open_packed(tmp_path / "aq.fb") as packed:
        assert packed.model.required_features == ("activation_quant",)
        assert packed.model.activation_quant == QUANTIZED


def test_a_format_1_0_reader_refuses_the_file(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "aq.fb", required_features=("activation_quant",),
          activation_quant=QUANTIZED)
    write(tmp_path / "plain.fb")
    # Format 1.0 readers know flag bit 0 only (that is all the 1.0 preamble check accepts).
    monkeypatch.setattr(preamble, "KNOWN_FLAGS", FLAG_INDEX_ZSTD)
    with pytest.raises(UnsupportedVersion, match="flags 0x3 .*needs a newer weightpack"):
        open_packed(tmp_path / "aq.fb")
    with open_packed(tmp_path / "plain.fb"):
        pass  # files without features stay readable by them


def test_an_unknown_feature_is_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(features.FEATURES, "dynamic_gating", 2)  # a writer from the future
    blob = write(tmp_path / "f.fb", required_features=("dynamic_gating",))
    assert struct.unpack_from("<H", blob, 10)[0] == 2
    monkeypatch.delitem(features.FEATURES, "dynamic_gating")
    with pytest.raises(UnsupportedVersion, match="needs a weightpack that reads format 1.2 or "
                       "newer: feature 'dynamic_gating' is unknown to this one"):
        open_packed(tmp_path / "f.fb")
    with pytest.raises(UnsupportedVersion, match="dynamic_gating"):
        runtime.load(tmp_path / "f.fb")


def test_declarations_must_agree_with_the_data(tmp_path: Path) -> None:
    blob = write(tmp_path / "aq.fb", required_features=("activation_quant",),
                 activation_quant=QUANTIZED)
    cases = {
        "no_flag": restamp(blob, flags=FLAG_INDEX_ZSTD),
        "old_minor": restamp(blob, minor=0),
    }
    for name, bad in cases.items():
        (tmp_path / f"{name}.fb").write_bytes(bad)
        with pytest.raises(FormatError, match="flag|format 1.0"):
            open_packed(tmp_path / f"{name}.fb")
    (tmp_path / "flag_only.fb").write_bytes(restamp(write(tmp_path / "p.fb"),
                                                    flags=FLAG_INDEX_ZSTD | 2))
    with pytest.raises(FormatError, match="disagree"):
        open_packed(tmp_path / "flag_only.fb")
    write(tmp_path / "undeclared.fb", activation_quant=QUANTIZED)
    with pytest.raises(FormatError, match="must come together"):
        open_packed(tmp_path / "undeclared.fb")
    for bad_q, message in ((replace(QUANTIZED[0], bits=9), "1..8 bits"),
                           (replace(QUANTIZED[0], clip=0.0), "clip"),
                           (replace(QUANTIZED[0], module=""), "module name")):
        write(tmp_path / "q.fb", required_features=("activation_quant",),
              activation_quant=(bad_q,))
        with pytest.raises(FormatError, match=message):
            open_packed(tmp_path / "q.fb")
    write(tmp_path / "missing.fb", required_features=("activation_quant",),
          activation_quant=(ActivationQuantRecord("layer9.conv", 2, 1.0),))
    with pytest.raises(ArchitectureError, match="layer9.conv"):
        runtime.load(tmp_path / "missing.fb")


def test_runtime_applies_it_and_int8_refuses_it(tmp_path: Path) -> None:
    write(tmp_path / "aq.fb", required_features=("activation_quant",),
          activation_quant=QUANTIZED)
    model = runtime.load(tmp_path / "aq.fb")
    seen = {}
    model.layer1[0].conv2.register_forward_pre_hook(
        lambda m, inputs: seen.setdefault("x", inputs[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    levels = torch.unique(seen["x"])  # 2 bits on [0, 1]: 0, 1/3, 2/3, 1
    assert len(levels) <= 4 and float(levels.min()) >= 0 and float(levels.max()) <= 1
    assert torch.allclose(levels * 3, torch.round(levels * 3))
    with pytest.raises(QuantError, match="cannot apply the model's own activation"):
        quant.int8_model(tmp_path / "aq.fb", act_scales={"conv1": 0.1})
    with pytest.raises(QuantError, match="without --int8"):
        quant.calibrate(model, [(torch.zeros(1, 3, 32, 32), torch.zeros(1))])


def _half_scales_file(path: Path, declared: bool, half: bool = True) -> bytes:
    """A ResNet-20 file whose layer1.0.conv1 is a per-channel uniform tensor with Float16
    (or Float32) scales, declaring the half_scales feature or not."""
    data = DataSection(8)
    encoder = Encoder(data, "raw")
    records = []
    for n, t in cifar_resnet20().state_dict().items():
        tensor = RawTensor(t, t.dtype)
        if n == "layer1.0.conv1.weight":
            scales = t.abs().mean(dim=(1, 2, 3)).to(torch.float16 if half else torch.float32)
            tensor = UniformTensor(torch.where(t >= 0, 1, -1).int(), scales, None, 2, 0)
        records.append(encoder.tensor(n, tensor).record)
    model = ModelRecord(
        producer="weightpack test", method="test", method_config_json="{}", source_sha256="",
        architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"), input=CIFAR_SPEC,
        num_classes=10, tensors=tuple(records), fp32_bytes=1,
        required_features=("half_scales",) if declared else ())
    blob = b"".join(layout(model, data).chunks)
    path.write_bytes(blob)
    return blob


def test_half_scales_is_format_1_3_and_older_readers_refuse_it(tmp_path: Path,
                                                                monkeypatch) -> None:
    blob = _half_scales_file(tmp_path / "h.fb", declared=True)
    assert struct.unpack_from("<HH", blob, 8) == (1, 3)
    model = runtime.load(tmp_path / "h.fb")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # A format 1.2 reader: it does not know the feature, and says which reader to get.
    monkeypatch.delitem(features.FEATURES, "half_scales")
    monkeypatch.setattr(features, "FORMAT_MINOR", 2)
    with pytest.raises(UnsupportedVersion, match="reads format 1.3 or newer: feature "
                       "'half_scales' is unknown to this one"):
        runtime.load(tmp_path / "h.fb")


def test_half_scales_declaration_must_agree_with_the_scales(tmp_path: Path) -> None:
    _half_scales_file(tmp_path / "undeclared.fb", declared=False)
    _half_scales_file(tmp_path / "unused.fb", declared=True, half=False)
    for name in ("undeclared", "unused"):
        with pytest.raises(FormatError, match="half_scales"):
            open_packed(tmp_path / f"{name}.fb")
