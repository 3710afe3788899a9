"""The main job end to end, as a user runs it: compress the shared ResNet-20 with each
post-training method, evaluate every packed file on the CIFAR-10 test folder, print a table.

    python tools/demo.py [--limit N] [--out DIR]

Uses the `packer` and `runtime` commands themselves. Shared assets come from
$WEIGHTPACK_SHARED (default: ../shared beside the repository).
"""

from __future__ import annotations

import argparse
import contextlib
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="evaluate on N test images (default: all)")
    parser.add_argument("--out", type=Path, help="keep the packed files in DIR (default: a "
                        "temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    shared = shared_dir()
    model = shared / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    data = shared / "data" / "cifar10"
    if not model.is_file() or not data.is_dir():
        sys.exit(f"shared assets not found under {shared}: set WEIGHTPACK_SHARED")
    with contextlib.ExitStack() as stack:
        if args.out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weightpack-demo-")))
        else:
            out = args.out
            out.mkdir(parents=True, exist_ok=True)
        rows = run_configs(model, data, out, args.limit)
    print("\n" + table(rows))
    return 0


def run_configs(model: Path, data: Path, out: Path, limit: int | None) -> list[dict]:
    """Pack and evaluate every configuration; one row of figures each."""
    limit_flags = ["--limit", str(limit)] if limit else []
    rows: list[dict] = []
    print(f"model {model.name}, data {data}, files in {out}", flush=True)
    for label, flags in CONFIGS:
        fb = out / (label.split(" ")[0] + "-" + str(len(rows)) + ".fb")
        packed = run_json(["packer", "compress", str(model), "-o", str(fb), *flags])
        scores = run_json(["runtime", "eval", str(fb), "--cifar10", str(data), *limit_flags])
        rows.append({"label": label, **packed, "top1": scores["top1"],
                     "images": scores["images"]})
        print(f"  {label:<22} {packed['file_bytes']:>10,} B  {scores['top1']:6.2f}%",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The summary table. bits/w counts the compressed (Conv/Linear) weights only, so rows that
    compress none show "-"; bits/param is the whole file over every parameter."""
    base = rows[0]["top1"]
    lines = [f"{'config':<22} {'file bytes':>11} {'ratio':>7} {'bits/w':>7} {'bits/param':>10} "
             f"{'top-1':>7} {'vs fp32':>8}  images"]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.2f}" if r["compressed_weights"] else "-"
        lines.append(f"{r['label']:<22} {r['file_bytes']:>11,} {r['ratio']:>6.2f}x {bpw:>7} "
                     f"{r['bits_per_parameter']:>10.2f} {r['top1']:>6.2f}% "
                     f"{r['top1'] - base:>+7.2f}  {r['images']:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
