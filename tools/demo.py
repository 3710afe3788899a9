"""The main job end to end, as a user runs it: compress the shared ResNet-20 with each
post-training method, evaluate every packed file on the CIFAR-10 test folder, print a table.

    python tools/demo.py [--limit N] [--out DIR]

Uses the `packer` and `runtime` commands themselves. Shared assets come from
$WEIGHTPACK_SHARED (default: ../shared beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("none (fp32 baseline)", ["--method", "none"]),
    ("none --fp16", ["--method", "none", "--fp16"]),
    ("int8", ["--method", "int8"]),
    ("uniform 5 bits", ["--method", "uniform"]),
    ("uniform 4 bits", ["--method", "uniform", "--set", "bits=4"]),
    ("kmeans K=32", ["--method", "kmeans"]),
    ("kmeans K=16", ["--method", "kmeans", "--set", "k=16"]),
]


def shared_dir() -> Path:
    return Path(os.environ.get("WEIGHTPACK_SHARED", ROOT.parent / "shared"))


def run_json(argv: list[str]) -> dict:
    result = subprocess.run([*argv, "--json", "--no-progress"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv[:2])} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="evaluate on N test images (default: all)")
    parser.add_argument("--out", type=Path, help="keep the packed files in DIR")
    args = parser.parse_args()
    shared = shared_dir()
    model = shared / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    data = shared / "data" / "cifar10"
    if not model.is_file() or not data.is_dir():
        sys.exit(f"shared assets not found under {shared}: set WEIGHTPACK_SHARED")
    out = args.out or Path(tempfile.mkdtemp(prefix="weightpack-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    limit = ["--limit", str(args.limit)] if args.limit else []
    rows = []
    print(f"model {model.name}, data {data}, files in {out}", flush=True)
    for label, flags in CONFIGS:
        fb = out / (label.split(" ")[0] + "-" + str(len(rows)) + ".fb")
        packed = run_json(["packer", "compress", str(model), "-o", str(fb), *flags])
        scores = run_json(["runtime", "eval", str(fb), "--cifar10", str(data), *limit])
        rows.append((label, packed["file_bytes"], packed["ratio"], packed["bits_per_weight"],
                     scores["top1"], scores["images"]))
        print(f"  {label:<22} {packed['file_bytes']:>10,} B  {scores['top1']:6.2f}%", flush=True)
    base = rows[0][4]
    print(f"\n{'config':<22} {'file bytes':>11} {'ratio':>7} {'bits/w':>7} {'top-1':>7} "
          f"{'vs fp32':>8}  images")
    for label, size, ratio, bpw, top1, images in rows:
        print(f"{label:<22} {size:>11,} {ratio:>6.2f}x {bpw:>7.2f} {top1:>6.2f}% "
              f"{top1 - base:>+7.2f}  {images:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
