"""The architecture allow-list: strict loading of the shared checkpoints, safety, inference."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor

from runtime import zoo
from runtime.errors import ArchitectureError
from runtime.zoo import inference, registry

CHECKPOINTS = [
    ("cifar_resnet20", "resnet20-12fca82f.th"),
    ("cifar_resnet32", "resnet32-d509ac18.th"),
    ("cifar_resnet44", "resnet44-014dd654.th"),
    ("cifar_resnet56", "resnet56-4bfd9763.th"),
    ("cifar_resnet20", "resnet20-cifar10jpg.pth"),
    ("cifar_resnet56", "resnet56-cifar10jpg.pth"),
]


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain state_dict, or the ``{"state_dict": ...}`` of a DataParallel ``.th`` checkpoint."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in obj:
        return {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    return obj


@pytest.fixture(scope="module")
def models_dir(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "cifar10"
    if not path.is_dir():
        pytest.skip(f"no shared CIFAR-10 models in {path}")
    return path


@pytest.mark.parametrize(("name", "filename"), CHECKPOINTS)
def test_cifar_checkpoints_load_strictly(models_dir: Path, name: str, filename: str) -> None:
    model = zoo.build(name, {})
    model.load_state_dict(load_state_dict(models_dir / filename), strict=True)
    with torch.inference_mode():
        out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(("filename", "expected"), [
    ("resnet20-cifar10jpg.pth", "cifar_resnet20"),
    ("resnet56-cifar10jpg.pth", "cifar_resnet56"),
    ("resnet32-d509ac18.th", "cifar_resnet32"),
])  # fmt: skip
def test_infer_cifar(models_dir: Path, filename: str, expected: str) -> None:
    assert zoo.infer(load_state_dict(models_dir / filename)) == [expected]
    assert zoo.infer_one(load_state_dict(models_dir / filename)) == (expected, {})


def test_cifar_shortcuts_are_parameter_free() -> None:
    model = zoo.build("cifar_resnet20")
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert not any("shortcut" in k for k in model.state_dict())


def test_infer_torchvision_resnet18() -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    assert zoo.infer(state) == ["torchvision.resnet18"]


def test_infer_adapts_num_classes() -> None:
    state = torchvision.models.resnet18(weights=None, num_classes=37).state_dict()
    assert zoo.infer_with_kwargs(state) == [("torchvision.resnet18", {"num_classes": 37})]
    cifar100 = zoo.build("cifar_resnet20", {"num_classes": 100}).state_dict()
    assert zoo.infer_with_kwargs(cifar100) == [("cifar_resnet20", {"num_classes": 100})]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet50"])
def test_infer_torchvision_from_shapes_only(arch: str) -> None:
    shapes = inference.shapes_of(f"torchvision.{arch}")
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert zoo.infer(fake) == [f"torchvision.{arch}"]


def test_infer_ignores_num_batches_tracked(models_dir: Path) -> None:
    state = load_state_dict(models_dir / "resnet20-cifar10jpg.pth")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert zoo.infer(state) == ["cifar_resnet20"]


def test_infer_nothing_matches() -> None:
    odd = {"conv1.weight": torch.zeros(16, 3, 3, 3), "linear.weight": torch.zeros(10, 7)}
    assert zoo.infer(odd) == []
    with pytest.raises(ArchitectureError, match="no allow-listed architecture"):
        zoo.infer_one(odd)
    with pytest.raises(ArchitectureError):
        zoo.infer({"a": "not a tensor"})  # type: ignore[dict-item]


def test_family_members_share_signature() -> None:
    """infer() skips a family by its representative's signature; all members must share it."""
    odd = {}
    for name in zoo.names():
        fam = registry.family(name)
        if inference._Signature.of(inference.shapes_of(name)) != inference._family_signature(fam):
            odd[name] = fam
    assert odd == {}


def test_names_cover_cifar_and_torchvision_classification() -> None:
    names = zoo.names()
    assert names[:4] == list(zoo.CIFAR_NAMES)
    wanted = {"torchvision.resnet18", "torchvision.resnet50", "torchvision.mobilenet_v2"}
    assert wanted <= set(names)
    assert not any("rcnn" in n or "deeplab" in n or "raft" in n for n in names)
    assert len(names) == 4 + len(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("name", [
    "os.system", "resnet18", "torchvision.models.resnet18", "torchvision.fasterrcnn_resnet50_fpn",
    "runtime.zoo.cifar_resnet.CifarResNet", "",
])  # fmt: skip
def test_unknown_names_rejected(name: str) -> None:
    with pytest.raises(ArchitectureError, match="cifar_resnet20.*torchvision.resnet18"):
        zoo.build(name, {})


@pytest.mark.parametrize("kwargs", [
    {"weights": "IMAGENET1K_V1"}, {"num_classes": "10"}, {"num_classes": True},
    {"num_classes": [10]}, {"num_classes": 0}, {"block": "Bottleneck"}, {"dropout": 2.0},
])  # fmt: skip
def test_bad_kwargs_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ArchitectureError):
        zoo.build("torchvision.resnet18", kwargs)


def test_kwargs_validated_per_builder() -> None:
    assert zoo.build("cifar_resnet20", {"num_classes": 100}).linear.out_features == 100
    with pytest.raises(ArchitectureError, match="not accepted"):
        zoo.build("cifar_resnet20", {"dropout": 0.1})
    with pytest.raises(ArchitectureError, match="does not accept"):
        zoo.build("torchvision.resnet18", {"dropout": 0.1})  # ResNet has no dropout
    assert zoo.build("torchvision.mobilenet_v2", {"num_classes": 5, "dropout": 0.0})


def test_build_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("build() tried to download weights")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    for name in ("torchvision.resnet18", "torchvision.squeezenet1_1"):
        builder = zoo.BUILDERS[name]
        assert isinstance(builder, functools.partial) and builder.keywords == {"weights": None}
        assert isinstance(zoo.build(name, {}), torch.nn.Module)
    assert list(tmp_path.iterdir()) == []


def test_input_specs() -> None:
    cifar = zoo.input_spec("cifar_resnet56")
    assert cifar == zoo.InputSpec(
        shape=(3, 32, 32),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize=None,
        crop=None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):  # callers cannot change the default
        cifar.mean = (1.0,)  # type: ignore[misc]
    assert zoo.input_spec("cifar_resnet56").mean == (0.485, 0.456, 0.406)
    spec = zoo.input_spec("torchvision.resnet50")
    assert (spec.shape, spec.resize, spec.crop) == ((3, 224, 224), 256, 224)
    assert zoo.input_spec("torchvision.inception_v3").crop == 299
    with pytest.raises(ArchitectureError):
        zoo.input_spec("nope")
