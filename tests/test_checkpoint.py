"""Input checkpoints: every accepted layout, safe loading, architecture resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from packer.architecture import resolve
from packer.checkpoint import load_checkpoint
from runtime import zoo
from runtime.errors import ArchitectureError, CheckpointError


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build("cifar_resnet20", {}).eval()


def assert_same(state_dict: dict, model: torch.nn.Module) -> None:
    expected = model.state_dict()
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_state_dict_layouts(tmp_path: Path, model, wrap: str) -> None:
    sd = model.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "best_prec1": 91.0, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "dataparallel": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    assert ckpt.fmt == "state_dict" and len(ckpt.sha256) == 64
    assert_same(ckpt.state_dict, model)


def test_safetensors(tmp_path: Path, model) -> None:
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.fmt == "safetensors"
    assert_same(ckpt.state_dict, model)


def test_torchscript(tmp_path: Path, model) -> None:
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.fmt == "torchscript" and ckpt.module is not None
    assert_same(ckpt.state_dict, model)


def test_pickled_module_needs_explicit_trust(tmp_path: Path, model) -> None:
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(tmp_path / "whole.pth")
    ckpt = load_checkpoint(tmp_path / "whole.pth", trust_pickle=True)
    assert ckpt.fmt == "pickled_module"
    assert_same(ckpt.state_dict, model)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")
    torch.save({"note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_resolve_infers_and_checks_architecture(model) -> None:
    sd = model.state_dict()
    assert resolve(sd, None).name == "cifar_resnet20"
    with pytest.raises(ArchitectureError, match="does not match architecture cifar_resnet56"):
        resolve(sd, "cifar_resnet56")
    with pytest.raises(ArchitectureError, match="not"):
        resolve(sd, "os.system")
    with pytest.raises(ArchitectureError, match="no known architecture"):
        resolve({"fc.weight": torch.zeros(3, 3)}, None)


def test_resolve_adapts_num_classes() -> None:
    sd = zoo.build("cifar_resnet20", {"num_classes": 100}).state_dict()
    arch = resolve(sd, "cifar_resnet20")
    assert arch.kwargs == {"num_classes": 100}
    assert arch.model.linear.out_features == 100


@pytest.mark.parametrize("arch", [None, "cifar_resnet20"])
def test_checkpoint_saved_before_num_batches_tracked(tmp_path: Path, model, arch) -> None:
    """The layout of the original CIFAR ResNets: torch's strict load accepts it, so do we."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd, "best_prec1": 91.78}, tmp_path / "old.th")
    resolved = resolve(load_checkpoint(tmp_path / "old.th").state_dict, arch)
    assert resolved.name == "cifar_resnet20"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(resolved.model(x), model(x))
    assert int(resolved.model.bn1.num_batches_tracked) == 0


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "dataparallel", "legacy",
                                    "safetensors", "torchscript"])
def test_every_readme_layout_packs_and_runs(tmp_path: Path, model, layout: str) -> None:
    """The README's list of checkpoint layouts, each packed and loaded, not just read."""
    import runtime
    from packer.compress import PackRequest, pack

    sd = model.state_dict()
    src = tmp_path / ("m.safetensors" if layout == "safetensors" else "m.pth")
    if layout == "safetensors":
        save_file(sd, str(src))
    elif layout == "torchscript":
        torch.jit.script(model).save(str(src))
    else:
        legacy = {f"module.{k}": v for k, v in sd.items() if "num_batches" not in k}
        torch.save({"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
                    "model": {"model": sd}, "dataparallel": {f"module.{k}": v for k, v in
                                                             sd.items()},
                    "legacy": {"state_dict": legacy, "best_prec1": 91.78}}[layout], src)
    report = pack(PackRequest(src, tmp_path / "m.fb", "none", coder="raw", progress=False))
    assert report["architecture"]["builder"] == "cifar_resnet20"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(runtime.load(tmp_path / "m.fb")(x), model(x))
