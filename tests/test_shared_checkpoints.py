"""Every checkpoint in the shared assets packs, loads and runs: users bring files like these.

The original CIFAR ResNets (`resnet*-*.th`) were saved before PyTorch had
`num_batches_tracked`, nested under `state_dict` with DataParallel's `module.` prefix; the
fine-tuned ones are plain state_dicts. Method `none` keeps the weights exact, so the packed
model must give the very logits of the source checkpoint loaded into its architecture (coder
`raw`: the entropy coders have tests of their own, and this keeps each case under a second).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import runtime
from packer.compress import PackRequest, pack
from runtime import zoo
from tests.assets import REPO_ROOT

SUFFIXES = {".th", ".pth", ".pt", ".safetensors"}
LARGE_BYTES = 2_000_000  # ResNet-44/56 files: each still packs in a few seconds


def _shared_models() -> Path:
    return Path(os.environ.get("WEIGHTPACK_SHARED", REPO_ROOT.parent / "shared")) / "models"


def _checkpoints() -> list:
    found = sorted(p for p in _shared_models().rglob("*") if p.suffix in SUFFIXES)
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow]
                         if p.stat().st_size > LARGE_BYTES else []) for p in found]


def test_the_shared_models_are_there(shared_dir: Path) -> None:
    assert len(_checkpoints()) >= 6, f"expected the six CIFAR ResNets in {shared_dir / 'models'}"


def _source_model(path: Path, builder: str) -> torch.nn.Module:
    """The checkpoint loaded the way its authors load it: torch's own strict load_state_dict,
    which accepts a state_dict saved before `num_batches_tracked` existed."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = zoo.build(builder, {}).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("path", _checkpoints())
def test_every_shared_checkpoint_packs_loads_and_runs(path: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{path.stem}.fb"
    report = pack(PackRequest(path, out, "none", coder="raw", progress=False))
    assert report["file_bytes"] == out.stat().st_size
    builder = report["architecture"]["builder"]
    assert builder == f"cifar_resnet{path.stem.split('-')[0].removeprefix('resnet')}"
    loaded = runtime.load(out)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(x), _source_model(path, builder)(x))
