"""Missing shared assets: skipped locally, a failure under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import REPO_ROOT, require


def test_a_missing_asset_skips_locally_and_fails_under_ci(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no test data"):
        require(tmp_path / "nothing", "test data")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true needs every shared asset"):
        require(tmp_path / "nothing", "test data")
    assert require(tmp_path, "test data") == tmp_path


def test_ci_run_without_the_shared_folder_stops_with_one_error(tmp_path: Path) -> None:
    env = {**os.environ, "CI": "true", "WEIGHTPACK_SHARED": str(tmp_path / "missing")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "CI=true but the shared assets are not at" in result.stdout + result.stderr
    assert "passed" not in result.stdout
