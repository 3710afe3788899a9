"""Int8 QDQ graph vs fp32 graph on onnxruntime's CPU provider: throughput and top-1.

For resnet20 and resnet56 (packed with `int8`; resnet20 also with `kmeans`): calibrate the
activation scales (percentile 99.99 on --calib-images train images), export the fp32 graph
and the QDQ graph (`runtime.quant.qdq_model`; both run through `quant.cpu_session`, which
leaves the fp32 graph as it is), and time both sessions at batch 64, interleaved (the order
alternates every round, after warm-up) so background load hits both alike; each figure is
the median of the rounds (the bar) next to the fastest round (the least disturbed one).
Then top-1 of both graphs on the test images. Also prints which op types ORT's optimizer
left in each graph (QLinearConv appears only if it fused the QDQ nodes).

Writes docs/results/int8_throughput.md:
``python tools/bench/int8_throughput.py [--limit 10000] [--threads 2] [--allow-dirty]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import (
    BAR_FAILED,
    Bar,
    PackConfig,
    add_results_args,
    command_line,
    ensure_packed,
    md_table,
    refuse_dirty_tree,
    setup_torch,
    shared_dir,
    verdict,
    write_results,
)

from runtime import quant
from runtime.data import cifar10_dataset, make_loader
from runtime.zoo.specs import CIFAR_SPEC

TARGET = 1.3
CASES = (("resnet20", "int8"), ("resnet20", "kmeans"), ("resnet56", "int8"))


def load_images(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = cifar10_dataset(shared_dir() / "data" / "cifar10", split, CIFAR_SPEC)
    batches = list(make_loader(data, 500, 2, limit=limit))
    return torch.cat([b.images for b in batches]), torch.cat([b.targets for b in batches])


def interleaved(a: quant.OnnxSession, b: quant.OnnxSession, x: np.ndarray, rounds: int,
                warmup: int = 3) -> tuple[list[float], list[float]]:
    """Seconds per run of `a` and of `b` on batch `x`, alternating which goes first."""
    for _ in range(warmup):
        a(x), b(x)
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            start = time.perf_counter()
            (a, b)[i](x)
            times[i].append(time.perf_counter() - start)
    return times[0], times[1]


def top1(model: quant.OnnxSession, images: torch.Tensor, targets: torch.Tensor) -> float:
    hits = sum(int((model(images[i:i + 250]).argmax(1) == targets[i:i + 250]).sum())
               for i in range(0, len(images), 250))
    return 100.0 * hits / len(images)


def optimized_ops(model: onnx.ModelProto, threads: int, workdir: Path, tag: str) -> str:
    path = workdir / f"{tag}-optimized.onnx"
    quant.cpu_session(model, threads=threads, optimized_path=str(path))
    ops = quant.graph_types(onnx.load(str(path)))
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=10_000, help="test images for top-1")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="timed runs of each graph (>= 5)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    add_results_args(ap)
    args = ap.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    setup_torch(1)
    calib, _ = load_images("train", args.calib_images)
    images, targets = load_images("test", args.limit)
    x = np.ascontiguousarray(images[: args.batch].numpy())
    speed_rows, acc_rows, op_lines, bars = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model_name, method in CASES:
            path = ensure_packed(work, model_name, PackConfig(method, method))
            pack = quant.load_int8(path)
            scales = quant.calibrate(pack.module, calib.split(128))
            fp32 = quant.export_fp32(pack.module, pack.input_shape)
            int8 = quant.qdq_model(pack, scales)
            ort_fp32 = quant.cpu_session(fp32, threads=args.threads)
            ort_int8 = quant.cpu_session(int8, threads=args.threads)
            exact = sum(pack.exact_layers().values())
            if method == "int8" or model_name == "resnet20":
                f_times, q_times = interleaved(ort_fp32, ort_int8, x, args.rounds)
                f_ips, q_ips = (len(x) / statistics.median(t) for t in (f_times, q_times))
                ok = q_ips / f_ips >= TARGET
                speed_rows.append([f"{model_name} ({method} pack)", f"{f_ips:.0f}",
                                   f"{q_ips:.0f}", f"{q_ips / f_ips:.2f}x",
                                   f"{min(f_times) / min(q_times):.2f}x", verdict(ok)])
                bars.append(Bar(f"int8 {model_name} ({method} pack): int8 graph >= {TARGET}x "
                                "the fp32 graph's images/s on onnxruntime CPU", ok,
                                f"{q_ips / f_ips:.2f}x ({q_ips:.0f} vs {f_ips:.0f} images/s)"))
            if model_name == "resnet20":
                f_acc, q_acc = top1(ort_fp32, images, targets), top1(ort_int8, images, targets)
                acc_rows.append([f"{model_name} {method}", f"{exact}/{len(pack.weights)}",
                                 f"{f_acc:.2f}", f"{q_acc:.2f}", f"{q_acc - f_acc:+.2f}"])
            if (model_name, method) == ("resnet20", "int8"):
                for tag, graph in (("fp32", fp32), ("int8", int8)):
                    op_lines.append(f"- {tag}: {optimized_ops(graph, args.threads, work, tag)}")
    body = "\n".join([
        f"Throughput: batch {args.batch}, {args.threads} intra-op threads, ORT_ENABLE_ALL, median "
        f"of {args.rounds} interleaved runs (the order alternates every round, after warm-up); "
        "the bar reads the medians, the fastest-round ratio is shown beside it.",
        "",
        md_table(["model", "fp32 img/s", "int8 img/s", "int8 / fp32 (median)",
                  "int8 / fp32 (fastest rounds)", f">= {TARGET}x"],
                 speed_rows),
        "",
        f"Top-1 on {len(images):,} test images (activations calibrated on {len(calib):,} train "
        "images, percentile 99.99; ORT sessions):",
        "",
        md_table(["pack", "layers exact in int8", "fp32 top-1", "int8 top-1", "delta"],
                 acc_rows),
        "",
        "Op types in ORT's optimized resnet20 graphs "
        "(`SessionOptions.optimized_model_filepath`):",
        "",
        *op_lines,
        "",
        "Absolute images/s move with the load of this shared machine; the ratio is timed in "
        "interleaved rounds and moves much less.",
    ])
    if not args.no_write:
        path = write_results("int8_throughput", "Int8 QDQ vs fp32 on onnxruntime CPU",
                             command_line(__file__, argv), body, bars)
        print(f"wrote {path}", file=sys.stderr)
    print(body)
    return 0 if all(b.ok for b in bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
