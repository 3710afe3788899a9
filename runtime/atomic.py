"""Atomic file output: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from runtime.errors import WeightpackError


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes]) -> int:
    """Write chunks to a temp file beside `path`, fsync, then rename over it.

    Returns the bytes written. The temp file is removed on any failure, including
    KeyboardInterrupt, so the destination either holds the old content or the new one.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise WeightpackError(f"{path}: output folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written
