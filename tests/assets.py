"""Where the read-only shared assets (models, data sets) live, and what a test does without them.

Locally a missing asset skips the tests that need it. Under ``CI=true`` it fails them: a CI
run must not pass by quietly running less.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """``$WEIGHTPACK_SHARED``, else ``<repo root>/../shared``."""
    return Path(os.environ.get("WEIGHTPACK_SHARED", REPO_ROOT.parent / "shared"))


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(message: str) -> NoReturn:
    """Skip the test, or fail it under CI=true."""
    if under_ci():
        pytest.fail(f"{message}; CI=true needs every shared asset (set WEIGHTPACK_SHARED)",
                    pytrace=False)
    pytest.skip(message)


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else skip (fail under CI) naming `what` is missing."""
    if not path.exists():
        missing(f"no {what} at {path}")
    return path
