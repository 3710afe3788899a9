"""Architecture names as users type them: torchvision's, timm's and the CIFAR ResNets' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from packer import cli as packer_cli
from packer.architecture import resolve
from runtime import zoo
from runtime.errors import ArchitectureError
from runtime.zoo import registry


@pytest.mark.parametrize("typed, full", [
    ("resnet18", "torchvision.resnet18"),  # torchvision.models.get_model's name
    ("mobilenet_v3_small", "torchvision.mobilenet_v3_small"),
    ("resnet20", "cifar_resnet20"),  # the name pytorch_resnet_cifar10 gives it
    ("torchvision.resnet18", "torchvision.resnet18"),
    ("cifar_resnet56", "cifar_resnet56"),
])
def test_short_names_resolve(typed: str, full: str) -> None:
    assert zoo.resolve_name(typed) == full


def test_timm_short_names() -> None:
    pytest.importorskip("timm")
    assert zoo.resolve_name("deit_tiny_patch16_224") == "timm.deit_tiny_patch16_224"
    assert zoo.short_name("timm.deit_tiny_patch16_224") == "deit_tiny_patch16_224"
    # A name both libraries have: torchvision's, unless only timm's fits the checkpoint.
    assert zoo.resolve_name("efficientnet_b0") == "torchvision.efficientnet_b0"
    timm_sd = zoo.build("timm.efficientnet_b0", {}).state_dict()
    assert zoo.resolve_name("efficientnet_b0", timm_sd) == "timm.efficientnet_b0"


def test_ambiguous_names_list_the_candidates(monkeypatch) -> None:
    twin = registry.BUILDERS["cifar_resnet20"]
    monkeypatch.setitem(registry.BUILDERS, "torchvision.resnet20", twin)
    with pytest.raises(ArchitectureError, match="ambiguous") as err:
        zoo.resolve_name("resnet20")
    assert "cifar_resnet20" in str(err.value) and "torchvision.resnet20" in str(err.value)


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(ArchitectureError, match="resnet18") as err:
        zoo.resolve_name("resnet19")
    assert "packer archs" not in str(err.value)  # the runtime does not know the packer
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        zoo.resolve_name("os.system")


def test_packer_resolves_short_names_against_the_checkpoint() -> None:
    torch.manual_seed(0)
    sd = zoo.build("torchvision.resnet18", {"num_classes": 10}).state_dict()
    arch = resolve(sd, "resnet18")
    assert arch.name == "torchvision.resnet18" and arch.kwargs == {"num_classes": 10}
    with pytest.raises(ArchitectureError, match="does not match architecture cifar_resnet20"):
        resolve(sd, "resnet20")


def test_compress_accepts_a_short_arch(shared_dir: Path, tmp_path: Path, capsys) -> None:
    src = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path / "r20.fb"
    assert packer_cli.main(["compress", str(src), "--method", "int8", "--arch", "resnet20",
                            "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["builder"] == "cifar_resnet20"


def test_archs_lists_short_names(capsys) -> None:
    assert packer_cli.main(["archs"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip() and not line.startswith(" ")}
    assert rows["torchvision.resnet18"] == ["resnet18"]
    assert rows["cifar_resnet20"] == ["resnet20"]
    assert packer_cli.main(["archs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"name": "torchvision.resnet18", "short": "resnet18"} in listed
