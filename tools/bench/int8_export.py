"""Exported int8 against exported fp32 in a plain onnxruntime.InferenceSession on the CPU
(issue 12): what a user who runs `runtime export` and serves the file with onnxruntime gets.

The shared ResNet-20 and ResNet-56 are packed `int8` with activation scales calibrated on
--calib-images train images; `runtime export` writes the fp32 graph, the int8 graph for
`--target onnxruntime` and for `--target tensorrt`. Each file is opened with
`onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])` (options:
intra-op threads only, everything else onnxruntime's default) and run on batches of --batch
test images, interleaved (order rotating each round) after warm-up, at 1 and 2 threads; min
and median images/s. Bar: the onnxruntime target >= 1.5x fp32 (median). Agreement: top-1 of
the three graphs on --limit test images (timing only needs a batch; the accuracy of int8
packing is in int8_throughput.py).

    python tools/bench/int8_export.py [--rounds 15]   # writes docs/results/int8_export.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import (
    BAR_FAILED,
    Bar,
    add_results_args,
    checkpoint_path,
    command_line,
    md_table,
    refuse_dirty_tree,
    shared_dir,
    verdict,
    write_results,
)

from packer.compress import PackRequest, pack
from runtime.data import cifar10_dataset, make_loader
from runtime.onnx import export_onnx
from runtime.quant import export_int8
from runtime.zoo.specs import CIFAR_SPEC

BAR = 1.5
MODELS = ("resnet20", "resnet56")
GRAPHS = {"fp32": None, "int8 --target onnxruntime": "onnxruntime",
          "int8 --target tensorrt": "tensorrt"}
"""What `runtime export --onnx` writes: no --int8, or --int8 with that --target."""


def images(limit: int) -> tuple[np.ndarray, np.ndarray]:
    data = cifar10_dataset(shared_dir() / "data" / "cifar10", "test", CIFAR_SPEC)
    batches = list(make_loader(data, 500, 0, limit=limit))
    return (torch.cat([b.images for b in batches]).numpy(),
            torch.cat([b.targets for b in batches]).numpy())


def plain_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=1000, help="test images for the agreement")
    ap.add_argument("--calib-images", type=int, default=512)
    add_results_args(ap)
    args = ap.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    torch.set_num_threads(1)
    x_all, y_all = images(args.limit)
    x = np.ascontiguousarray(x_all[:args.batch])
    speed: list[list[object]] = []
    agree: list[list[object]] = []
    bars: list[Bar] = []
    with tempfile.TemporaryDirectory(prefix="wp-int8x-") as tmp:
        work = Path(tmp)
        for model in MODELS:
            fb = work / f"{model}.fb"
            pack(PackRequest(checkpoint_path(model), fb, "int8", progress=False,
                             calib_data=shared_dir() / "data" / "cifar10",
                             calib_images=args.calib_images, workers=0))
            paths = {}
            for label, target in GRAPHS.items():
                paths[label] = work / f"{model}-{len(paths)}.onnx"
                if target is None:
                    export_onnx(fb, paths[label])
                else:
                    export_int8(fb, paths[label], target)
            for threads in (1, 2):
                sessions = {k: plain_session(p, threads) for k, p in paths.items()}
                for sess in sessions.values():
                    for _ in range(3):
                        run(sess, x)
                samples: dict[str, list[float]] = {k: [] for k in sessions}
                names = list(sessions)
                for r in range(args.rounds):
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        start = time.perf_counter()
                        run(sessions[name], x)
                        samples[name].append(time.perf_counter() - start)
                base = samples["fp32"]
                for name, t in samples.items():
                    best, med = args.batch / min(t), args.batch / statistics.median(t)
                    r_med = statistics.median(base) / statistics.median(t)
                    r_best = min(base) / min(t)
                    judged = name == "int8 --target onnxruntime"
                    if judged:
                        bars.append(Bar(
                            f"{model}, {threads} thread(s): exported int8 (--target "
                            f"onnxruntime) >= {BAR}x the exported fp32 in a plain "
                            "InferenceSession (median)", r_med >= BAR,
                            f"{r_med:.2f}x median, {r_best:.2f}x best ({med:.0f} vs "
                            f"{args.batch / statistics.median(base):.0f} img/s)"))
                    speed.append([model, threads, name, f"{best:.0f}", f"{med:.0f}",
                                  f"{r_best:.2f} / {r_med:.2f}",
                                  f"**{verdict(r_med >= BAR)}**" if judged else ""])
                if threads == 2:
                    preds = {k: np.concatenate([run(s, x_all[i:i + 250]).argmax(1)
                                                for i in range(0, len(x_all), 250)])
                             for k, s in sessions.items()}
                    row = [model] + [f"{100 * (p == y_all).mean():.2f}" for p in preds.values()]
                    same = preds["int8 --target onnxruntime"] == preds["fp32"]
                    row.append(f"{100 * same.mean():.1f}")
                    agree.append(row)
    body = "\n".join([
        f"## Plain onnxruntime.InferenceSession, CPU, batch {args.batch}", "",
        md_table(["model", "threads", "exported graph", "best img/s", "median img/s",
                  "vs fp32 best / median", f">= {BAR}x"], speed, "lrlrrrl"), "",
        f"{args.rounds} interleaved rounds after 3 warm-up runs each; ratio = fp32 time over "
        "this graph's time (min over min, median over median).", "",
        f"## Top-1 of the exported graphs on {len(y_all)} test images (2 threads)", "",
        md_table(["model", *GRAPHS, "int8 (onnxruntime) argmax = fp32 argmax %"], agree),
    ])
    print(body)
    if not args.no_write:
        path = write_results("int8_export", "Exported int8 vs fp32 in plain onnxruntime",
                             command_line(__file__, argv), body, bars)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all(b.ok for b in bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
