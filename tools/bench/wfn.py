"""WFN / PWFN on the shared ResNet-20: unique values, entropy, true file bytes, top-1.

    python tools/bench/wfn.py -o wfn.json \
        --point "wfn d=0.0075: wfn distance_allowed=0.0075" \
        --point "pwfn: pwfn" --common fixing_epochs=1 train_limit=10000
    python tools/bench/wfn.py --table wfn.json      # markdown rows from a finished run

Every point is a real packed file (packer.compress.pack with the CIFAR-10 folder as training
data): `file_bytes` are bytes on disk, `ratio` = fp32 bytes / file bytes, `bits_per_weight`
= 8 x coded bytes of the fixed tensors (indices + codebooks) / their count. Top-1 is measured
by loading the file with the runtime on all 10,000 test images, next to the uncompressed
baseline measured by the same code in the same run. `--common` options apply to every
point of the method they name (options a method does not have are skipped for it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from packer.compress import PackRequest, pack
from packer.methods import METHODS
from packer.training import DataSpec
from runtime import load
from runtime.data import cifar10_dataset, make_loader
from runtime.evaluate import evaluate
from runtime.zoo.cifar_resnet import cifar_resnet20

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("WEIGHTPACK_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models/cifar10/resnet20-cifar10jpg.pth"
DATA = SHARED / "data/cifar10"
KEYS = ("unique_values", "unique_values_nonzero", "entropy_bits", "entropy_bits_nonzero",
        "zero_fraction", "centres", "int8_exact_count")


def top1_of(model: torch.nn.Module, limit: int | None) -> float:
    test = cifar10_dataset(DATA, "test")
    return evaluate(model, make_loader(test, 500, 2, limit=limit), progress=False).top1


def baseline_top1(limit: int | None) -> float:
    model = cifar_resnet20()
    model.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    return top1_of(model.eval(), limit)


def parse_point(text: str, common: list[str]) -> tuple[str, str, list[str]]:
    label, _, spec = text.partition(":")
    method, *sets = spec.split()
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r} in point {text!r}")
    known = METHODS[method].options
    shared = [s for s in common if s.partition("=")[0] in known]
    return label.strip(), method, shared + sets


def run_point(label: str, method: str, sets: list[str], limit: int | None, batch: int,
              baseline: float) -> dict[str, Any]:
    data = DataSpec("cifar10", DATA, batch_size=batch, workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.fb"
        started = time.perf_counter()
        report = pack(PackRequest(MODEL, out, method=method, overrides=sets, data=data,
                                  progress=False))
        seconds = time.perf_counter() - started
        top1 = top1_of(load(out), limit)
    row = {"label": label, "method": method, "overrides": sets,
           "file_bytes": report["file_bytes"], "ratio": round(report["ratio"], 2),
           "bits_per_weight": round(report["bits_per_weight"], 3),
           **{k: report.get(k) for k in KEYS}, "top1": round(top1, 2),
           "delta": round(top1 - baseline, 2), "pack_seconds": round(seconds, 1),
           "timings": report.get(f"{method}_timings"),
           "iterations": report.get(f"{method}_iterations")}
    print(json.dumps({k: v for k, v in row.items() if k != "iterations"}), flush=True)
    return row


def settings(overrides: list[str]) -> str:
    """key=value settings with later ones winning, as the packer applies them."""
    merged: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        merged.pop(key, None)
        merged[key] = value
    return " ".join(f"{k}={v}" for k, v in merged.items())


def table(doc: dict[str, Any]) -> str:
    head = ("| point | settings | unique (all / non-zero) | entropy bits (all / non-zero) | "
            "file bytes | ratio | bits / weight in file | top-1 | vs baseline | pack s |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [head]
    for r in doc["points"]:
        rows.append(
            f"| {r['label']} | `{settings(r['overrides'])}` | {r['unique_values']} / "
            f"{r['unique_values_nonzero']} | {r['entropy_bits']:.3f} / "
            f"{r['entropy_bits_nonzero']:.3f} | {r['file_bytes']:,} | {r['ratio']:.2f} | "
            f"{r['bits_per_weight']:.3f} | {r['top1']:.2f} | {r['delta']:+.2f} | "
            f"{r['pack_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--point", action="append", default=[],
                   help="'LABEL: METHOD key=value ...' (repeatable)")
    p.add_argument("--common", nargs="*", default=[], help="key=value for every point")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, help="write the JSON results here")
    p.add_argument("--table", type=Path, help="print the markdown table of a results file")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(args.threads)
    points = [parse_point(t, args.common) for t in args.point]
    if not points:
        raise SystemExit("give at least one --point")
    baseline = baseline_top1(args.limit)
    print(json.dumps({"baseline_top1": baseline}), flush=True)
    doc: dict[str, Any] = {"baseline_top1": baseline, "test_images": args.limit or 10000,
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "points": []}
    for label, method, sets in points:
        doc["points"].append(run_point(label, method, sets, args.limit, args.batch_size,
                                       baseline))
        if args.output:
            args.output.write_text(json.dumps(doc, indent=1))
    print(table(doc))


if __name__ == "__main__":
    main()
