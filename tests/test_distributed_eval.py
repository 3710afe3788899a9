"""`runtime eval` under torchrun: two gloo processes on CPU give the single-process result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from packer.compress import PackRequest, pack


@pytest.mark.slow
def test_torchrun_two_processes_match_one(shared_dir: Path, tmp_path: Path) -> None:
    fb = tmp_path / "r20.fb"
    pack(PackRequest(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth", fb,
                     "kmeans", progress=False))
    args = ["-m", "runtime.cli", "eval", str(fb), "--cifar10", str(shared_dir / "data" / "cifar10"),
            "--limit", "150", "--workers", "0", "--json", "--no-progress", "--batch-size", "32"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args], capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one, two = json.loads(single.stdout), json.loads(multi.stdout)
    assert two["processes"] == 2 and one["processes"] == 1
    assert (two["top1"], two["top5"], two["images"]) == (one["top1"], one["top5"], one["images"])
