"""The report folder appears whole or not at all: everything is written into a temporary
folder beside it, which is renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import WeightpackError

MARKER = "<!-- weightpack report -->"  # first line of index.html: a folder we may replace
INDEX = "index.html"


def _replaceable(out: Path) -> bool:
    """A folder we may write over: empty, or a report this command wrote before."""
    if not any(out.iterdir()):
        return True
    index = out / INDEX
    try:
        with open(index, encoding="utf-8") as f:
            return f.readline().strip() == MARKER
    except OSError:
        return False


def check_output(out: Path) -> None:
    """Fail before any work when `out` cannot become the report folder."""
    if out.exists() and not out.is_dir():
        raise WeightpackError(f"{out}: exists and is not a folder; choose a folder for the report")
    if out.is_dir() and not _replaceable(out):
        raise WeightpackError(f"{out}: folder is not empty and holds no earlier report; choose "
                              "a new or empty folder")
    parent = out.parent
    if not parent.is_dir():
        raise WeightpackError(f"{out}: cannot write the report, folder {parent} does not exist")


@contextlib.contextmanager
def report_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out` (an earlier report
    there is replaced), on any failure it is removed and `out` is left as it was."""
    check_output(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise WeightpackError(f"{out}: cannot write the report ({exc.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        # rename() cannot replace a non-empty folder: move the old report aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)  # also replaces an empty folder
