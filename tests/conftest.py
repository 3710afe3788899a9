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
