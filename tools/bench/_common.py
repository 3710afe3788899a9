"""Helpers shared by the benchmark modules: asset paths, packing, timing, Markdown tables."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

MODELS = {
    "resnet20": ("resnet20-cifar10jpg.pth", "cifar_resnet20"),
    "resnet56": ("resnet56-cifar10jpg.pth", "cifar_resnet56"),
}
"""Short model name -> (checkpoint file under models/cifar10/, zoo architecture)."""


def shared_dir() -> Path:
    """The shared read-only assets: $WEIGHTPACK_SHARED, else ``<repo root>/../shared``."""
    env = os.environ.get("WEIGHTPACK_SHARED")
    path = Path(env) if env else REPO_ROOT.parent / "shared"
    if not path.is_dir():
        raise SystemExit(f"shared assets not found at {path} (set WEIGHTPACK_SHARED)")
    return path


def checkpoint_path(model: str) -> Path:
    """Path of the fine-tuned checkpoint of ``model`` ("resnet20" or "resnet56")."""
    return shared_dir() / "models" / "cifar10" / MODELS[model][0]


def arch_of(model: str) -> str:
    """Zoo architecture name of ``model``."""
    return MODELS[model][1]


def setup_torch(threads: int = 2) -> None:
    """Pin torch's intra-op thread count so every measurement runs under the same setting."""
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class PackConfig:
    """One packing configuration of the method table."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()
    coder: str = "auto"

    @property
    def slug(self) -> str:
        """A file-name-safe identifier."""
        parts = [self.method, *self.overrides]
        if self.coder != "auto":
            parts.append(f"coder={self.coder}")
        text = "-".join(parts)
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def pack_file(source: Path, output: Path, cfg: PackConfig) -> dict[str, Any]:
    """Pack ``source`` into ``output`` with ``cfg``; returns the packer's report."""
    from packer.compress import PackRequest, pack

    req = PackRequest(source=source, output=output, method=cfg.method,
                      overrides=list(cfg.overrides), coder=cfg.coder, progress=False)
    return pack(req)


def packed_path(workdir: Path, model: str, cfg: PackConfig) -> Path:
    """Where the benchmark keeps ``model`` packed with ``cfg`` inside ``workdir``."""
    return workdir / f"{model}-{cfg.slug}.fb"


def ensure_packed(workdir: Path, model: str, cfg: PackConfig) -> Path:
    """The packed file of ``model`` with ``cfg``, packing it first unless already there."""
    path = packed_path(workdir, model, cfg)
    if not path.exists():
        pack_file(checkpoint_path(model), path, cfg)
    return path


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def machine_lines() -> list[str]:
    """Markdown bullet lines describing the date, machine and software versions."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}",
        f"- machine: nproc {usable_cpus()}, CPU `{cpu_model()}`, "
        f"{platform.system()} {platform.release()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__} "
        f"(torch threads {torch.get_num_threads()}), numpy {np.__version__}",
        f"- code: {code_state()}",
        f"- load: 1-minute load average {os.getloadavg()[0]:.1f} when written "
        f"({usable_cpus()} CPUs; above that, other jobs shared them and times ran slower)",
    ]


def code_state() -> str:
    """The git commit and the files that differ from it (the code actually benchmarked)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    dirty = dirty_files()
    if not dirty:
        return f"commit {commit}, no uncommitted changes"
    return f"commit {commit} + uncommitted changes in {', '.join(dirty)}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
             align: str | None = None) -> str:
    """A Markdown table; ``align`` holds one of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


RESULTS_DIR = REPO_ROOT / "docs" / "results"
"""One Markdown file per benchmark, each rewritten whole by the script that measures it."""


def dirty_files() -> list[str]:
    """Tracked or untracked files that differ from HEAD, outside the outputs (docs/results/
    and the index docs/RESULTS.md generated from it)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(git status failed)"]
    return [line[3:] for line in out.splitlines()
            if line[3:] and not line[3:].startswith(("docs/results/", "docs/RESULTS.md"))]


def refuse_dirty_tree(allow_dirty: bool) -> None:
    """Figures in docs/ must come from committed code: stop before measuring otherwise."""
    dirty = dirty_files()
    if dirty and not allow_dirty:
        raise SystemExit("refusing to measure a dirty tree (commit first, or pass --allow-dirty "
                         "for a run that is marked as such): " + ", ".join(dirty[:8]))


def add_results_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark that writes docs/results/ shares."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="measure uncommitted code anyway; the results file then says so "
                             "in its first lines")
    parser.add_argument("--no-write", action="store_true",
                        help="print the report only; leave docs/results/ alone")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that regenerates a results file, as a user would type it."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"tools/bench/{Path(script).name}", *args])


@dataclass(frozen=True)
class Bar:
    """One acceptance bar: its wording, the numbers it was judged on, and the verdict."""

    name: str
    ok: bool
    measured: str


BAR_FAILED = 3
"""Exit status of a benchmark that ran to the end with a bar failing (errors exit 1 or 2)."""
BARS_HEADING = "## Bars"
_BAR_LINE = re.compile(r"^- \*\*(PASS|FAIL)\*\* (.+?) — (.*)$")


def bars_section(bars: Sequence[Bar]) -> str:
    """The ``## Bars`` section of a results file (parsed back by :func:`parse_bars`)."""
    return "\n".join([BARS_HEADING, "", *(f"- **{verdict(b.ok)}** {b.name} — {b.measured}"
                                           for b in bars)])


def parse_bars(text: str) -> list[Bar]:
    """The bars a results file states, in order."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.strip() == BARS_HEADING
            continue
        match = _BAR_LINE.match(line) if inside else None
        if match:
            out.append(Bar(match.group(2), match.group(1) == "PASS", match.group(3)))
    return out


def write_results(name: str, title: str, command: str, body: str,
                  bars: Sequence[Bar] = ()) -> Path:
    """Write docs/results/<name>.md whole: title, how it was made, its bars, then the body.

    The header names the command and the commit; a run on a dirty tree says so in its first
    lines, so no figure can pass for committed code when it was not.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    dirty = dirty_files()
    warning = ([f"> **NOT REPRODUCIBLE: measured with changes not in the commit below "
                f"({', '.join(dirty[:8])}).**", ""] if dirty else [])
    sections = [bars_section(bars), ""] if bars else []
    text = "\n".join([f"# {title}", "", *warning, f"Regenerate: `{command}`", "",
                      *machine_lines(), "", *sections, body.rstrip(), ""])
    path = RESULTS_DIR / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
