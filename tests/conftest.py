"""Shared fixtures: where the read-only shared assets (models, data sets) live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``$WEIGHTPACK_SHARED`` or ``<repo root>/../shared``; skips the test when absent."""
    path = Path(os.environ.get("WEIGHTPACK_SHARED", REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared assets not found at {path} (set WEIGHTPACK_SHARED)")
    return path


@pytest.fixture(scope="session")
def r20(shared_dir: Path) -> Path:
    """The fine-tuned ResNet-20, a plain state_dict: the baseline the tests compress."""
    return shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"


@pytest.fixture(scope="session")
def cifar(shared_dir: Path) -> Path:
    """CIFAR-10 as a JPEG folder (train/ and test/)."""
    return shared_dir / "data" / "cifar10"
