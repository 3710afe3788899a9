"""Commands that answer at once: --help, --version, argument errors and a missing input file
import none of torch, onnx or onnxruntime (issue 12). Asserted on the modules a fresh
interpreter has loaded, not on a clock; tools/bench/startup.py measures the time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import REPO_ROOT

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime")

# Runs one CLI's main() in a fresh interpreter and prints its exit status and the heavy
# libraries it imported.
PROBE = """
import json, sys
from importlib import import_module
module, argv, heavy = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
try:
    status = import_module(module).main(argv)
except SystemExit as exc:  # argparse: --help, --version, argument errors
    status = exc.code
print(json.dumps({"status": status, "imported": [m for m in heavy if m in sys.modules]}),
      file=sys.__stderr__)
"""

CASES = [
    ("packer", ["--help"], 0),
    ("packer", ["--version"], 0),
    ("packer", ["compress", "--help"], 0),
    ("packer", ["report", "--help"], 0),
    ("packer", ["methods", "--help"], 0),
    ("packer", [], 2),  # no command
    ("packer", ["compress", "model.pth"], 2),  # --method missing
    ("packer", ["compress", "--method", "kmeans", "missing.pth"], 2),
    ("packer", ["inspect", "missing.fb"], 2),
    ("packer", ["report", "missing.fb", "--out", "r"], 2),
    ("runtime", ["--help"], 0),
    ("runtime", ["--version"], 0),
    ("runtime", ["eval", "--help"], 0),
    ("runtime", ["export", "--help"], 0),
    ("runtime", ["eval", "m.fb", "--bogus"], 2),
    ("runtime", ["eval", "missing.fb", "--cifar10", "data"], 2),
    ("runtime", ["export", "missing.fb", "--onnx", "m.onnx"], 2),
    ("runtime", ["inspect", "missing.fb"], 2),
    ("runtime", ["verify", "missing.fb"], 2),
]


@pytest.mark.parametrize(("prog", "argv", "status"), CASES,
                         ids=[" ".join([p, *a]) or p for p, a, _ in CASES])
def test_answers_without_importing_heavy_libraries(prog: str, argv: list[str], status: int,
                                                   tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, f"{prog}.cli", json.dumps(argv), ",".join(HEAVY)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["status"] == status, done.stderr
    assert result["imported"] == [], f"{prog} {' '.join(argv)} imported {result['imported']}"
    if status == 2 and argv[-1:] != ["--bogus"] and "missing" in " ".join(argv):
        assert "no such file" in done.stderr


def test_the_probe_sees_an_import() -> None:
    """The probe above can fail: a command that loads a model imports torch."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "packer.cli", json.dumps(["archs", "--json"]), "torch"],
        env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(done.stderr.strip().splitlines()[-1])["imported"] == ["torch"]
