"""Models outside the zoo: their own graph travels in the file as weight-free ONNX."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import runtime
from packer.compress import PackRequest, pack
from runtime.decode import decode_state_dict
from runtime.errors import ConfigError
from runtime.format.reader import open_packed


class Tiny(nn.Module):
    """A model no zoo builder knows."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("graph") / "tiny.pt"
    torch.jit.script(model).save(str(path))
    return path, model


def test_torchscript_model_round_trips_losslessly(scripted, tmp_path: Path) -> None:
    path, model = scripted
    out = tmp_path / "tiny.fb"
    report = pack(PackRequest(path, out, "none", input_size=(3, 32, 32), progress=False))
    assert report["architecture"]["kind"] == "onnx_graph" and report["num_classes"] == 7
    loaded = runtime.load(out)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    with open_packed(out) as packed:
        graph = onnx.load_from_string(bytes(packed.blob(packed.model.architecture.graph)))
    stored = sum(len(t.raw_data) for t in graph.graph.initializer)
    assert stored < 1024  # the weights live in the packed tensors, not in the graph
    assert isinstance(runtime.load(out, backend="onnx"), onnx.ModelProto)


def test_compressed_graph_model_matches_its_compressed_weights(scripted, tmp_path: Path) -> None:
    path, _ = scripted
    out = tmp_path / "tiny-kmeans.fb"
    pack(PackRequest(path, out, "kmeans", overrides=["k=8"], input_size=(3, 32, 32),
                     progress=False))
    with open_packed(out) as packed:
        state = decode_state_dict(packed)
    reference = Tiny().eval()
    reference.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.allclose(runtime.load(out)(x), reference(x), rtol=1e-5, atol=1e-5)
    assert torch.unique(state["head.weight"]).numel() <= 8


def test_graph_needs_an_input_size(scripted, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input-size"):
        pack(PackRequest(scripted[0], tmp_path / "x.fb", "none", progress=False))
    assert not (tmp_path / "x.fb").exists()


def test_trusted_pickle_is_stored_as_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(Tiny().eval(), tmp_path / "whole.pth")
    out = tmp_path / "whole.fb"
    report = pack(PackRequest(tmp_path / "whole.pth", out, "int8", input_size=(3, 16, 16),
                              trust_pickle=True, progress=False))
    assert report["architecture"]["kind"] == "onnx_graph"
    assert runtime.load(out)(torch.zeros(1, 3, 16, 16)).shape == (1, 7)


def test_traced_torchscript_gives_its_own_input_size(tmp_path: Path) -> None:
    """torch.jit.trace records the example input's shape: no --input-size needed."""
    torch.manual_seed(0)
    model = Tiny().eval()
    path = tmp_path / "traced.pt"
    torch.jit.trace(model, torch.zeros(1, 3, 24, 20)).save(str(path))
    out = tmp_path / "traced.fb"
    report = pack(PackRequest(path, out, "none", progress=False))
    assert report["input"]["shape"] == [3, 24, 20] and report["num_classes"] == 7
    x = torch.randn(3, 3, 24, 20, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(runtime.load(out)(x), model(x), rtol=1e-5, atol=1e-5)
    # --input-size still wins when given
    assert pack(PackRequest(path, out, "none", input_size=(3, 16, 16),
                            progress=False))["input"]["shape"] == [3, 16, 16]


def test_scripted_torchscript_asks_for_the_input_size(scripted, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="records no input shape"):
        pack(PackRequest(scripted[0], tmp_path / "x.fb", "none", progress=False))
