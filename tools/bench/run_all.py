"""Run every benchmark (each writes its own docs/results/<name>.md), then the index.

    python tools/bench/run_all.py                  # everything: several hours of 2 CPU cores
    python tools/bench/run_all.py --quick          # smoke check: tiny settings, writes nothing
    python tools/bench/run_all.py --only wfn coders

Each benchmark runs as its own process with the command its results file names, so a full
run is exactly the sequence of commands in docs/RESULTS.md; `summary.py` then rewrites
docs/RESULTS.md from the results files. Run long jobs under the shared CPU lock.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import BAR_FAILED, REPO_ROOT, refuse_dirty_tree

HERE = Path(__file__).resolve().parent

FULL: dict[str, list[str]] = {
    "accuracy": ["accuracy.py"],
    "coders": ["coders.py"],
    "coders-synthetic": ["coders.py", "--synthetic"],
    "int8_throughput": ["int8_throughput.py"],
    "pqf-select": ["pqf.py", "select"],
    "pqf-bar": ["pqf.py", "bar"],
    "pqf-curve": ["pqf.py", "curve"],
    "pqf-ftcurve": ["pqf.py", "ftcurve"],
    "pqf-speed": ["pqf.py", "speed"],
    "pqf-timing": ["pqf.py", "timing"],
    "pqf-refsize": ["pqf.py", "refsize"],
    "wfn": ["wfn.py"],
    "lowbit-select": ["lowbit.py", "select", "--lock", ""],
    "lowbit": ["lowbit.py", "table", "--lock", ""],
    "fbs-select": ["fbs.py", "select", "--epochs", "1", "--train-limit", "4000", "--val-limit",
                   "2000", "--lock", ""],
    "fbs": ["fbs.py", "table", "--ratios", "0.5", "0.7", "0.3", "--epochs", "2",
            "--train-limit", "15000", "--lock", ""],
    "report_time": ["report_time.py"],
    "startup": ["startup.py"],
    "load_speed": ["load_speed.py"],
    "int8_export": ["int8_export.py"],
    "eval_speed": ["eval_speed.py"],
    "budget-validation": ["budget.py", "validate", "--sensitivity-check"],
    "budget": ["budget.py", "curve"],
}
"""Every benchmark with the arguments of its committed results file (`bar` reads the recipe
`select` chose, so it runs after it). `lowbit.py` and `fbs.py` take the CPU lock per point
unless told `--lock ''`: run_all runs under the lock as a whole, so it passes ''."""

QUICK: dict[str, list[str]] = {
    "accuracy": ["accuracy.py", "--quick"],
    "coders": ["coders.py", "--repeats", "3"],
    "coders-synthetic": ["coders.py", "--synthetic", "--count", "100000", "--repeats", "1"],
    "int8_throughput": ["int8_throughput.py", "--limit", "500", "--rounds", "5"],
    "pqf-select": ["pqf.py", "select", "--epochs", "1", "--train-limit", "256",
                   "--holdout", "500"],
    "pqf-bar": ["pqf.py", "bar", "--recipe", "D", "--epochs", "1", "--train-limit", "256",
                "--holdout", "500", "--test-limit", "500"],
    "pqf-curve": ["pqf.py", "curve", "--ks", "16", "--test-limit", "500"],
    "pqf-ftcurve": ["pqf.py", "ftcurve", "--ks", "16", "--train-limit", "256",
                    "--test-limit", "500"],
    "pqf-speed": ["pqf.py", "speed", "--batches", "2"],
    "pqf-timing": ["pqf.py", "timing", "--kmeans-iters", "1", "--sls", "10"],
    "pqf-refsize": ["pqf.py", "refsize"],
    "wfn": ["wfn.py", "--only", "wfn d=0.01 post-training", "--limit", "500"],
    "startup": ["startup.py", "--rounds", "2"],
    "load_speed": ["load_speed.py", "--models", "resnet20", "--rounds", "2"],
    "int8_export": ["int8_export.py", "--rounds", "2", "--limit", "250", "--calib-images", "64"],
    "eval_speed": ["eval_speed.py", "--limit", "256", "--rounds", "1"],
    "budget-validation": ["budget.py", "validate", "--only", "nearest", "--ratios", "15",
                          "--holdout", "200", "--calib-images", "32", "--no-write"],
}
"""Smoke settings: every code path of every benchmark, in minutes; nothing is written.
`lowbit.py`, `fbs.py` (whose table reads the recipe its select wrote) and `report_time.py` are
left out, and `budget.py curve` reads the committed validation rows, so the smoke run checks
`validate`."""


def command_of(args: Sequence[str]) -> str:
    """A plan entry as the command a user types (what its results file names)."""
    return shlex.join(["python", f"tools/bench/{args[0]}", *args[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, --no-write: checks that every benchmark runs")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), help="run only these")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="pass --allow-dirty on (the results files are marked)")
    args = parser.parse_args(argv)
    if not args.quick:
        refuse_dirty_tree(args.allow_dirty)
    plan = QUICK if args.quick else FULL
    names = [n for n in plan if not args.only or n in args.only]
    if args.quick and args.only and set(args.only) - set(QUICK):
        parser.error("no smoke settings for " + ", ".join(sorted(set(args.only) - set(QUICK))))
    extra = ["--no-write"] if args.quick else (["--allow-dirty"] if args.allow_dirty else [])
    outcomes = []
    for name in names:
        cmd = [sys.executable, str(HERE / plan[name][0]), *plan[name][1:], *extra]
        print(f"== {name}: {command_of([*plan[name], *extra])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL).returncode
        outcomes.append((name, rc, time.perf_counter() - started))
    if not args.quick:
        subprocess.run([sys.executable, str(HERE / "summary.py")], cwd=REPO_ROOT, check=True)
    for name, rc, seconds in outcomes:
        state = {0: "ok, every bar passes", BAR_FAILED: "ok, a bar fails"}.get(
            rc, f"ERROR (exit {rc})")
        print(f"{name:<16} {seconds / 60:6.1f} min  {state}", file=sys.stderr)
    return 0 if all(rc == 0 for _, rc, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
