"""Start-up time of the `packer` and `runtime` commands: --help, --version, an argument error
and a missing input file, each in a fresh interpreter, as a user's shell runs them.

Every command runs once untimed, then --rounds interleaved rounds (the order rotates each
round, so background load hits every command alike); min and median per command. Two
reference rows: the bare interpreter (`python -c pass`) and `import torch`, what every
command paid before the heavy imports moved into the commands that need them.

    python tools/bench/startup.py [--rounds 15]   # writes docs/results/startup.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import (
    BAR_FAILED,
    REPO_ROOT,
    Bar,
    add_results_args,
    command_line,
    md_table,
    refuse_dirty_tree,
    verdict,
    write_results,
)

BAR_SECONDS = 0.5
ENTRY = "import sys; from {prog}.cli import main; sys.exit(main())"
"""What the console scripts `packer` and `runtime` run (pyproject.toml [project.scripts])."""

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("packer", "--help"),
    ("packer", "--version"),
    ("packer", "compress", "--help"),
    ("packer", "compress", "model.pth"),  # argument error: --method missing
    ("packer", "compress", "--method", "kmeans", "missing.pth"),
    ("runtime", "--help"),
    ("runtime", "--version"),
    ("runtime", "eval", "--help"),
    ("runtime", "eval", "m.fb", "--bogus"),  # argument error
    ("runtime", "eval", "missing.fb", "--cifar10", "data"),
)
REFERENCE = {
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (for comparison)": [sys.executable, "-c", "import torch"],
}


def argv_of(command: tuple[str, ...]) -> list[str]:
    prog, *args = command
    return [sys.executable, "-c", ENTRY.format(prog=prog), *args]


def time_once(argv: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, list[float]]:
    jobs = {" ".join(c): argv_of(c) for c in COMMANDS} | REFERENCE
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    with tempfile.TemporaryDirectory(prefix="wp-startup-") as cwd:
        for argv in jobs.values():  # warm the page cache
            time_once(argv, cwd, env)
        names = list(jobs)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_once(jobs[name], cwd, env))
    return samples


def render(samples: dict[str, list[float]], rounds: int) -> tuple[str, list[Bar]]:
    rows = []
    for name, times in samples.items():
        judged = name not in REFERENCE
        med, low = statistics.median(times), min(times)
        rows.append([f"`{name}`", f"{low * 1e3:.0f}", f"{med * 1e3:.0f}",
                     f"{max(times) * 1e3:.0f}",
                     f"**{verdict(med < BAR_SECONDS)}**" if judged else "(reference)"])
    table = md_table(["command", "min ms", "median ms", "max ms", f"median < {BAR_SECONDS} s"],
                     rows, "lrrrl")
    timed = {n: t for n, t in samples.items() if n not in REFERENCE}
    slowest = max(timed, key=lambda n: statistics.median(timed[n]))
    worst = statistics.median(timed[slowest])
    bars = [Bar(f"--help, --version, argument errors and a missing file answer in < "
                f"{BAR_SECONDS} s (median, packer and runtime)", worst < BAR_SECONDS,
                f"slowest `{slowest}`: median {worst * 1e3:.0f} ms, min "
                f"{min(timed[slowest]) * 1e3:.0f} ms")]
    return "\n".join([
        table, "",
        f"{rounds} interleaved rounds after one untimed run of each, each command a fresh "
        "interpreter started as the console script starts it (`from prog.cli import main`). "
        "An argument error and a missing input file exit with status 2 and one line on "
        "stderr. tests/test_startup.py checks that none of these commands imports torch, onnx "
        "or onnxruntime.",
    ]), bars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    add_results_args(parser)
    args = parser.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    samples = measure(args.rounds)
    body, bars = render(samples, args.rounds)
    print(body)
    if not args.no_write:
        path = write_results("startup", "Start-up time of packer and runtime",
                             command_line(__file__, argv), body, bars)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all(b.ok for b in bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
