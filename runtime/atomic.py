"""Atomic file output: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from runtime.errors import OutputError


def check_output(path: str | os.PathLike, example: str = "model.fb") -> Path:
    """Refuse, in one line, an output path that cannot be written, before any work is done:
    a missing folder, a directory, something that is not a regular file (/dev/null: replacing
    it would remove the device), or a folder that takes no new file (tried, not guessed from
    permission bits, which root ignores). Returns the path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name, e.g. {path / example}")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: exists and is not a regular file; give a file name")
    if not parent.is_dir():
        raise OutputError(f"{path}: output folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in folder {parent} "
                          f"({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes]) -> int:
    """Write chunks to a temp file beside `path`, fsync, then rename over it.

    Returns the bytes written. The temp file is removed on any failure, including
    KeyboardInterrupt, so the destination either holds the old content or the new one.
    """
    path = check_output(path)
    parent = path.parent if str(path.parent) else Path(".")
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
