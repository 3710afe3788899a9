"""runtime.load as a service uses it: any torchvision model, ImageNet folders, many threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import runtime
from packer.compress import PackRequest, pack
from runtime import cli as runtime_cli, zoo


@pytest.fixture(scope="module")
def imagenet_model_file(tmp_path_factory) -> Path:
    """A 1000-class torchvision model packed from random weights (no ImageNet weights exist
    offline): enough to test the ImageNet path end to end, not accuracy."""
    folder = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    model = zoo.build("torchvision.squeezenet1_1", {})
    torch.save(model.state_dict(), folder / "squeezenet.pth")
    out = folder / "squeezenet.fb"
    pack(PackRequest(folder / "squeezenet.pth", out, "kmeans", progress=False))
    return out


def test_imagenet_eval_on_the_shared_sample(imagenet_model_file: Path, shared_dir: Path,
                                            capsys) -> None:
    sample = shared_dir / "data" / "imagenet-sample"
    capsys.readouterr()
    assert runtime_cli.main(["eval", str(imagenet_model_file), "--imagenet", str(sample),
                             "--workers", "0", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 40 and out["skipped"] == 0
    assert 0 <= out["top1"] <= out["top5"] <= 100


def test_torchvision_file_records_imagenet_input_spec(imagenet_model_file: Path) -> None:
    with runtime.open_packed(imagenet_model_file) as packed:
        spec = packed.model.input
        assert packed.model.architecture.builder == "torchvision.squeezenet1_1"
    assert (spec.shape, spec.resize, spec.crop) == ((3, 224, 224), 256, 224)
    assert packed.model.num_classes == 1000


def test_cifar_model_on_imagenet_is_refused(shared_dir: Path, tmp_path: Path, capsys) -> None:
    fb = tmp_path / "r20.fb"
    pack(PackRequest(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth", fb,
                     "int8", progress=False))
    code = runtime_cli.main(["eval", str(fb), "--imagenet",
                             str(shared_dir / "data" / "imagenet-sample")])
    assert code == 2 and "ImageNet-1k has 1000" in capsys.readouterr().err


def test_loading_in_eight_threads_gives_identical_modules(imagenet_model_file: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(lambda _: runtime.load(imagenet_model_file), range(8)))
    reference = models[0].state_dict()
    for model in models[1:]:
        state = model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outs = [m(x) for m in models[:3]]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_a_1000_class_file_without_names_answers_imagenet_names(imagenet_model_file: Path) -> None:
    from runtime.data import imagenet_classes

    names = runtime.class_names(imagenet_model_file)
    assert names is not None and len(names) == 1000
    assert names[0] == imagenet_classes()[0][1]
