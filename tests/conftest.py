"""Shared fixtures: where the read-only shared assets (models, data sets) live."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.assets import require, shared_root, under_ci


def pytest_configure(config: pytest.Config) -> None:
    """Under CI=true a missing shared folder stops the run with one clear error, before any
    test is collected, instead of skipping every test that needs it."""
    if under_ci() and not shared_root().is_dir():
        raise pytest.UsageError(
            f"CI=true but the shared assets are not at {shared_root()}: set WEIGHTPACK_SHARED "
            f"(or put them at ../shared beside the repository)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``$WEIGHTPACK_SHARED`` or ``<repo root>/../shared``; skips the test when absent (and
    fails it under CI=true)."""
    return require(shared_root(), "shared assets (set WEIGHTPACK_SHARED)")


@pytest.fixture(scope="session")
def r20(shared_dir: Path) -> Path:
    """The fine-tuned ResNet-20, a plain state_dict: the baseline the tests compress."""
    return require(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth",
                   "shared ResNet-20 checkpoint")


@pytest.fixture(scope="session")
def cifar(shared_dir: Path) -> Path:
    """CIFAR-10 as a JPEG folder (train/ and test/)."""
    return require(shared_dir / "data" / "cifar10", "shared CIFAR-10 folder")
