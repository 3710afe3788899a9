"""Evaluation speed: images/s of `runtime eval`'s loop per backend and loader worker count, the
default plan (`runtime.evaluate.eval_plan`) against the default before issue 12 (workers
min(4, cores), the model's library taking every core), and why the torch backend is slower
than onnxruntime on the CPU.

The model (shared CIFAR ResNet, packed `none`) runs on --limit CIFAR-10 test images (JPEG
files decoded by the loader, as `runtime eval --cifar10` does), batch 256, the same code path
as the command: `eval_plan(...).applied()`, `make_loader`, `evaluate`. Every configuration is
measured in --rounds interleaved rounds (order rotating); min and median images/s.
The torch backend runs what `runtime eval` runs (`runtime.evaluate.inference_model`: BatchNorm
folded into the convolutions, channels-last memory format on the CPU); diagnostics: the model
as loaded (neither), and where torch's forward spends its time (torch.profiler, one batch).

    python tools/bench/eval_speed.py [--model resnet20] [--limit 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

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
    usable_cpus,
    write_results,
)

import runtime
from packer.compress import PackRequest, pack
from runtime.data import cifar10_dataset, make_loader
from runtime.evaluate import EvalPlan, eval_plan, evaluate, inference_model
from runtime.onnx import session
from runtime.zoo.specs import CIFAR_SPEC

BAR = 1.5
BATCH = 256


def config_runner(fb: Path, backend: str, plan: EvalPlan, limit: int,
                  fold: bool = True) -> Callable[[], float]:
    dataset = cifar10_dataset(shared_dir() / "data" / "cifar10", "test", CIFAR_SPEC)
    with plan.applied():
        if backend == "onnx":
            model = session(fb, providers=["CPUExecutionProvider"], threads=plan.threads)
        else:
            model = runtime.load(fb)
            if fold:  # as `runtime eval` does
                model = inference_model(model)

    def run() -> float:
        with plan.applied():
            loader = make_loader(dataset, BATCH, plan.workers, limit)
            return evaluate(model, loader, "cpu", progress=False).images_per_s
    return run


def torch_profile(fb: Path, threads: int) -> str:
    model = inference_model(runtime.load(fb))
    x = torch.randn(BATCH, *CIFAR_SPEC.shape)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile() as prof:
            model(x)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in rows[:5])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    add_results_args(ap)
    args = ap.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    cores = usable_cpus()
    default = eval_plan("cpu")
    old = EvalPlan(min(4, cores), None)  # before issue 12: threads left at the library default
    with tempfile.TemporaryDirectory(prefix="wp-eval-") as tmp:
        fb = Path(tmp) / f"{args.model}.fb"
        pack(PackRequest(checkpoint_path(args.model), fb, "none", progress=False))
        configs: dict[tuple[str, str], Callable[[], float]] = {}
        for backend in ("torch", "onnx"):
            for workers in sorted({0, 1, 2, 4}):
                plan = eval_plan("cpu", workers)
                tag = " (default)" if plan == default else ""
                configs[backend, f"{workers} workers, {plan.threads} threads{tag}"] = \
                    config_runner(fb, backend, plan, args.limit)
            configs[backend, f"{old.workers} workers, all threads (old default)"] = \
                config_runner(fb, backend, old, args.limit)
        setting = f"{default.workers} workers, {default.threads} threads"
        configs["torch as loaded (no folding, no channels-last)", setting] = config_runner(
            fb, "torch", default, args.limit, fold=False)
        for run in configs.values():  # warm-up: page cache, first-use costs
            run()
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
        names = list(configs)
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                print(f"round {r}: {name}", file=sys.stderr, flush=True)
                samples[name].append(configs[name]())
        profile = torch_profile(fb, default.threads or cores)
    rows = [[backend, setting, f"{max(v):.0f}", f"{statistics.median(v):.0f}"]
            for (backend, setting), v in samples.items()]
    best = {b: max(statistics.median(v) for (bb, _), v in samples.items() if bb == b)
            for b in ("torch", "onnx")}
    ratio = best["onnx"] / best["torch"]
    body = "\n".join([
        f"## {args.model}, {args.limit} CIFAR-10 test images, batch {BATCH}, {cores} cores", "",
        md_table(["backend", "loader workers, model threads", "best img/s", "median img/s"],
                 rows, "llrr"), "",
        f"{args.rounds} interleaved rounds after one warm-up of each; images/s over the whole "
        "loop, JPEG decoding included. Default plan on this machine: "
        f"{default.workers} workers, {default.threads} threads.", "",
        f"torch's forward on one batch of {BATCH} (torch.profiler, self CPU time): {profile}.",
    ])
    bars = [Bar(f"torch backend within {BAR}x of the onnx backend's images/s on the CPU "
                "(best median of each)", ratio <= BAR,
                f"onnx / torch {ratio:.2f}x ({best['onnx']:.0f} vs {best['torch']:.0f} img/s)")]
    print(body)
    if not args.no_write:
        path = write_results("eval_speed", "Evaluation speed per backend and loader workers",
                             command_line(__file__, argv), body, bars)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all(b.ok for b in bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
