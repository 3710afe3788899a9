"""FBS channel gating on the shared ResNet-20: held-out selection, then the table.

    python tools/bench/fbs.py select     # docs/results/fbs-select.md (held-out only)
    python tools/bench/fbs.py table      # docs/results/fbs.md and fbs-kept.png (test)
    python tools/bench/fbs.py train ...  # table's training only: held-out curves, test unread

`select` packs candidate recipes at ratio 0.5 on a short schedule and scores each packed
file on 5,000 training images held out of training (the seeded split `holdout=5000`
trains without); it never reads the test set. It records the candidate with the best
held-out top-1 in docs/results/fbs-select.json. `table` trains that recipe (and refuses to
run without it) at keep ratios 0.7, 0.5 and 0.3 (`--ratios`) and evaluates each packed file
once on the 10,000 test images, next to the uncompressed baseline and the untrained gates
(epochs=0), all measured by the same code in the same run. Per point:

* top-1 and the MACs executed per image, counted by `runtime.gating.MacCounter` over the
  10,000 test images while they are evaluated (kept output channels x input channels that
  are not all zero, plus the predictors), against the dense count;
* batch-1 CPU latency of three forms of the same weights, BatchNorm folded in each, timed
  side by side in interleaved rounds (min and median per image): the dense model, the
  gated model as `runtime.load` runs it (every channel computed, then masked), and the
  channel-skipping path (`runtime.gating.inference_graph(skip=True)`: only the kept
  filters, only the live inputs);
* the packed size of `fbs+kmeans` (the same trained gates, k-means weights) and its top-1.

The stages of the schedule (0.9 -> 0.7 -> 0.5 -> 0.3) are shared: each point resumes the
stages it has in common with the previous one from their checkpoints in --workdir (the
same seed, data order and settings give the same stage), so the table trains each stage
once. Each point takes the shared CPU lock on its own (`--lock`).
"""

from __future__ import annotations

import packer  # noqa: F401  first: it sets the OpenMP wait policy, read when torch loads

# isort: split
import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BAR_FAILED,
    RESULTS_DIR,
    Bar,
    add_results_args,
    checkpoint_path,
    md_table,
    refuse_dirty_tree,
    setup_torch,
    shared_dir,
    verdict,
    write_results,
)
from lowbit import cpu_lock  # noqa: E402

from packer.compress import PackRequest, pack  # noqa: E402
from packer.training import DataSpec, build_datasets  # noqa: E402
from runtime import load  # noqa: E402
from runtime.data import cifar10_dataset, make_loader  # noqa: E402
from runtime.evaluate import evaluate  # noqa: E402
from runtime.gating import MacCounter, inference_graph  # noqa: E402

HOLDOUT = 5000
SEED = 0
RATIOS = (0.7, 0.5, 0.3)  # in this order: each point extends the previous one's schedule
BAR_RATIO, BAR_DROP, BAR_MACS = 0.5, 2.5, 0.55
HISTOGRAM_LAYER = "layer3.1.conv2"  # reads layer3.1.conv1's gated output
FREQUENCY_LAYER = "layer3.1.conv1"

SELECTED = RESULTS_DIR / "fbs-select.json"
"""Written by `select`: the recipe with the best held-out top-1, which `table` trains."""

SELECT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "lr 1e-3, distillation": ("lr=1e-3", "distill=true"),
    "lr 3e-4, distillation": ("lr=3e-4", "distill=true"),
    "lr 1e-3, labels (the reference)": ("lr=1e-3", "distill=false"),
    "lr 1e-3, distillation, reference init": ("lr=1e-3", "distill=true", "init=reference"),
    "lr 1e-3, distillation, gates on each block's first conv only":
        ("lr=1e-3", "distill=true", "layer*.conv2.gate=off"),
}
"""Each starts from calibrated predictors (fbs's `init=auto` when training) but the reference
init one, which starts as the reference does: the held-out comparison of the two starts.
All gate fbs's default set (every 3x3 block conv, as the reference) but the last, which
gates conv1 of each residual block only: its kept channels are what conv2 reads, so half of
both convs' MACs go, while conv2's output, which joins the residual sum, stays dense."""


def data_spec(workers: int) -> DataSpec:
    return DataSpec("cifar10", shared_dir() / "data" / "cifar10", batch_size=128,
                    workers=workers)


def test_set() -> Any:
    return cifar10_dataset(shared_dir() / "data" / "cifar10", "test")


def counted_accuracy(model: torch.nn.Module, dataset: Any, workers: int
                     ) -> tuple[float, MacCounter]:
    """Top-1 over `dataset`, counting MACs per image while it runs."""
    with MacCounter(model) as counter:
        top1 = evaluate(model, make_loader(dataset, 500, workers), progress=False).top1
    return top1, counter


def fbs_overrides(ratio: float, epochs: int, extra: tuple[str, ...],
                  final_epochs: int | None = None) -> list[str]:
    final = [] if final_epochs is None else [f"final_epochs={final_epochs}"]
    return [f"ratio={ratio}", f"epochs={epochs}", *final, f"holdout={HOLDOUT}", *extra]


def final_epochs_of(args: argparse.Namespace, ratio: float) -> int | None:
    """--final-epochs: one count for every point, or one per --ratios entry (None: --epochs)."""
    if args.final_epochs is None:
        return None
    if len(args.final_epochs) == 1:
        return args.final_epochs[0]
    return args.final_epochs[args.ratios.index(ratio)]


def stages_text(stages: int, epochs: int, final_epochs: int | None) -> str:
    """'3 x 4', or '2 x 4 + 12' when the last stage runs its own number of epochs."""
    if final_epochs is None or final_epochs == epochs:
        return f"{stages} x {epochs}"
    return f"{stages - 1} x {epochs} + {final_epochs}"


def pack_point(method: str, overrides: list[str], out: Path, workers: int) -> dict[str, Any]:
    started = time.perf_counter()
    report = pack(PackRequest(checkpoint_path("resnet20"), out, method=method,
                              overrides=overrides, data=data_spec(workers), seed=SEED,
                              progress=False))
    report["pack_s"] = round(time.perf_counter() - started, 1)
    return report


def training_detail(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: ratio, held-out top-1 by epoch (0 = start), best epoch, images/s."""
    out = []
    for stage in report.get("fbs_schedule", []):
        training = stage.get("training")
        if not training:
            continue
        out.append({"ratio": stage["ratio"], "epochs": stage["epochs"],
                    "holdout_by_epoch": [round(training["start_top1"], 2)]
                    + [round(h["top1"], 2) for h in training["history"]],
                    "best_epoch": training["best_epoch"],
                    "resumed_from": training["resumed_from"],
                    "images_per_s": [h["images_per_s"] for h in training["history"]]})
    return out


# --- latency -----------------------------------------------------------------------------------


def batch1_latency(models: dict[str, torch.nn.Module], images: torch.Tensor,
                   rounds: int) -> dict[str, dict[str, float]]:
    """Per model: min and median over `rounds` of the mean seconds per image, one image at
    a time; the models take turns within each round (order rotated every round)."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            for x in images[:4]:
                model(x.unsqueeze(0))
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                model = models[name]
                started = time.perf_counter()
                for x in images:
                    model(x.unsqueeze(0))
                times[name].append((time.perf_counter() - started) / len(images))
    return {n: {"min_ms": 1e3 * min(t), "median_ms": 1e3 * statistics.median(t)}
            for n, t in times.items()}


def dense_model() -> torch.nn.Module:
    from runtime.zoo.cifar_resnet import cifar_resnet20

    model = cifar_resnet20()
    model.load_state_dict(torch.load(checkpoint_path("resnet20"), map_location="cpu",
                                     weights_only=True))
    return model.eval()


# --- commands -----------------------------------------------------------------------------------


def chosen_recipe() -> tuple[str, tuple[str, ...]]:
    """The recipe `select` chose on the held-out split (label, --set values)."""
    if not SELECTED.is_file():
        raise SystemExit(f"{SELECTED} is missing: run `python tools/bench/fbs.py select` "
                         "first (the recipe is chosen on held-out images, never on test)")
    doc = json.loads(SELECTED.read_text(encoding="utf-8"))
    return doc["label"], tuple(doc["sets"])


def gate_settings(recipe: tuple[str, ...]) -> tuple[str, ...]:
    """The recipe's settings that choose which convs are gated (`GLOB.gate=...`)."""
    return tuple(s for s in recipe if ".gate=" in s)


def select(args: argparse.Namespace) -> str:
    """Held-out comparison of recipes on a short schedule at ratio 0.5; test not read."""
    rows = []
    scores: dict[str, float] = {}
    for label, sets in SELECT_CANDIDATES.items():
        with cpu_lock(args.lock), tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.fb"
            overrides = fbs_overrides(BAR_RATIO, args.epochs,
                                      (*sets, f"train_limit={args.train_limit}",
                                       f"val_limit={args.val_limit}"))
            report = pack_point("fbs", overrides, out, args.workers)
            holdout = build_datasets(data_spec(args.workers), HOLDOUT, SEED)[1]
            top1, counter = counted_accuracy(load(out), holdout, args.workers)
        summary = counter.summary()
        detail = training_detail(report)
        if summary["macs_ratio"] <= BAR_MACS:  # only a recipe within the MAC bar can win
            scores[label] = top1
        print(json.dumps({"label": label, "holdout": top1, **summary, "stages": detail}),
              file=sys.stderr, flush=True)
        rows.append([label, f"{top1:.2f}", f"{summary['macs_ratio']:.3f}",
                     " | ".join(" / ".join(f"{v:.2f}" for v in s["holdout_by_epoch"])
                                for s in detail), f"{report['pack_s']:.0f}"])
    best = max(scores, key=lambda label: scores[label])  # first listed wins a tie
    tmp = SELECTED.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"label": best, "sets": list(SELECT_CANDIDATES[best]),
                               "holdout_top1": scores[best]}, indent=1) + "\n",
                   encoding="utf-8")
    tmp.replace(SELECTED)
    return "\n\n".join([
        f"Held-out split: {HOLDOUT} training images (seed {SEED}), never trained on; the "
        "test images are not read. The pretrained model saw these images in its own "
        "training, so held-out accuracies run higher than test accuracies; they rank "
        f"recipes. Each candidate: fbs at ratio {BAR_RATIO}, stages 0.9 -> 0.7 -> 0.5, "
        f"{args.epochs} epoch(s) of {args.train_limit:,} images per stage (each stage's "
        f"best epoch picked on {args.val_limit:,} of the held-out images), Adam with a "
        "cosine learning rate per stage, L1 1e-8 on the saliencies, distillation at T=4 "
        "from the uncompressed model or cross-entropy on the labels.",
        md_table(["recipe", "held-out top-1", "MACs executed / dense",
                  "held-out top-1 by epoch, per stage (0 = start)", "pack s"], rows),
        f"Chosen (best held-out top-1 of those executing at most {BAR_MACS} of the dense "
        f"MACs on the held-out images; `table` trains it, read from {SELECTED.name}): "
        f"**{best}** (`{' '.join(SELECT_CANDIDATES[best])}`).",
    ])


def point_overrides(ratio: float, args: argparse.Namespace, workdir: Path,
                    recipe: tuple[str, ...]) -> list[str]:
    """The fbs settings of one table point; `train` and `table` share them (and so the stage
    checkpoints in workdir)."""
    extra = (*recipe, f"train_limit={args.train_limit}", f"checkpoint={workdir / 'stages'}")
    return fbs_overrides(ratio, args.epochs, extra, final_epochs_of(args, ratio))


def train(args: argparse.Namespace) -> str:
    """Train the table's points into --workdir and show their held-out curves; the test set is
    not read, so a schedule can be chosen on held-out images before `table` reads test
    (it then resumes every stage from the checkpoints)."""
    _check_points(args)
    _, recipe = chosen_recipe()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in args.ratios:
        with cpu_lock(args.lock):
            report = pack_point("fbs", point_overrides(ratio, args, workdir, recipe),
                                workdir / f"fbs-{ratio}.fb", args.workers)
        final = final_epochs_of(args, ratio)
        rows += [[f"fbs {ratio}", stages_text(len(report["fbs_schedule"]), args.epochs, final),
                  s["ratio"], s["epochs"], s["resumed_from"],
                  " / ".join(f"{v:.2f}" for v in s["holdout_by_epoch"]), s["best_epoch"],
                  max(s["holdout_by_epoch"])] for s in training_detail(report)]
    return md_table(["point", "stages x epochs", "stage ratio", "epochs", "resumed from",
                     "held-out top-1 by epoch", "best epoch", "best held-out"], rows)


def _check_points(args: argparse.Namespace) -> None:
    if args.final_epochs is not None and len(args.final_epochs) not in (1, len(args.ratios)):
        raise SystemExit("--final-epochs: give one count, or one per --ratios entry")
    if BAR_RATIO not in args.ratios:
        raise SystemExit(f"--ratios must include the bar's ratio {BAR_RATIO}")


def _point(ratio: float, args: argparse.Namespace, workdir: Path, recipe: tuple[str, ...],
           dense: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    final_epochs = final_epochs_of(args, ratio)
    overrides = point_overrides(ratio, args, workdir, recipe)
    with cpu_lock(args.lock):
        fbs_file = workdir / f"fbs-{ratio}.fb"
        report = pack_point("fbs", overrides, fbs_file, args.workers)
        model = load(fbs_file)
        top1, counter = counted_accuracy(model, test_set(), args.workers)
        latency = batch1_latency({"dense": inference_graph(dense),
                                  "gated (masked)": inference_graph(model),
                                  "gated (skipping)": inference_graph(model, skip=True)},
                                 images, args.rounds)
        kmeans_file = workdir / f"fbs-kmeans-{ratio}.fb"
        kreport = pack_point("fbs+kmeans", overrides, kmeans_file, args.workers)
        ktop1 = evaluate(load(kmeans_file), make_loader(test_set(), 500, args.workers),
                         progress=False).top1
    result = {"ratio": ratio, "epochs": args.epochs, "final_epochs": final_epochs, "top1": top1,
              **counter.summary(), "latency": latency,
              "fbs_bytes": report["file_bytes"], "kmeans_bytes": kreport["file_bytes"],
              "kmeans_ratio": kreport["ratio"], "kmeans_top1": ktop1,
              "stages": training_detail(report), "pack_s": report["pack_s"],
              "keep": sorted({g["keep"] for g in report["fbs_gates"].values()})}
    print(json.dumps(result), file=sys.stderr, flush=True)
    result["counter"] = counter
    return result


def _figure(counter: MacCounter, ratio: float, path: Path) -> dict[str, Any]:
    """Histograms of what the gates kept over the test images, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_image = counter.per_image().numpy() / counter.summary()["macs_dense"]
    layers = counter.layers
    live = torch.cat(layers[HISTOGRAM_LAYER].live_inputs).numpy()
    hits = layers[FREQUENCY_LAYER].kept_by_channel.numpy() / counter.images
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].hist(per_image, bins=40, color="#4477aa")
    axes[0].set(title=f"executed MACs per image (ratio {ratio})", xlabel="of dense",
                ylabel="test images")
    axes[1].hist(live, bins=np.arange(live.min() - 0.5, live.max() + 1.5), color="#228833")
    axes[1].set(title=f"{HISTOGRAM_LAYER}: live input channels", xlabel="channels not all "
                "zero (of 64)", ylabel="test images")
    axes[2].bar(np.arange(hits.size), np.sort(hits)[::-1], color="#cc6677")
    axes[2].set(title=f"{FREQUENCY_LAYER}: how often each channel is kept",
                xlabel="output channel (sorted)", ylabel="fraction of test images")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return {"per_image_min": float(per_image.min()), "per_image_max": float(per_image.max()),
            "per_image_p5": float(np.percentile(per_image, 5)),
            "per_image_p95": float(np.percentile(per_image, 95)),
            "live_min": int(live.min()), "live_max": int(live.max()),
            "live_mean": float(live.mean()),
            "always_kept": int((hits > 0.999).sum()), "never_kept": int((hits < 0.001).sum()),
            "channels": int(hits.size)}


def table(args: argparse.Namespace) -> tuple[str, list[Bar]]:
    _check_points(args)
    label, recipe = chosen_recipe()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dense = dense_model()
    images = torch.stack([test_set()[i][0] for i in range(args.latency_images)])
    with cpu_lock(args.lock):  # the baseline and the untrained gates: one short hold
        base, base_counter = counted_accuracy(dense, test_set(), args.workers)
        untrained_file = workdir / "fbs-untrained.fb"
        # The recipe's gate set, predictors as the reference initialises them (epochs=0).
        pack_point("fbs", fbs_overrides(BAR_RATIO, 0, gate_settings(recipe)), untrained_file,
                   args.workers)
        untrained, untrained_counter = counted_accuracy(load(untrained_file), test_set(),
                                                        args.workers)
    results = [_point(ratio, args, workdir, recipe, dense, images) for ratio in args.ratios]
    bar_point = next(r for r in results if r["ratio"] == BAR_RATIO)
    figure = _figure(bar_point["counter"], BAR_RATIO, RESULTS_DIR / "fbs-kept.png")

    rows = [["dense (uncompressed)", "-", f"{base:.2f}", "-",
             f"{base_counter.summary()['macs_dense'] / 1e6:.2f}M", "1.000", "-", "-", "-", ""]]
    u = untrained_counter.summary()
    rows.append([f"fbs {BAR_RATIO}, untrained gates (reference init)", 0, f"{untrained:.2f}",
                 f"{untrained - base:+.2f}", f"{u['macs_executed'] / 1e6:.2f}M",
                 f"{u['macs_ratio']:.3f}", "-", "-", "-", ""])
    lat_rows = []
    bars = [Bar(f"resnet20 fbs ratio {BAR_RATIO}: within {BAR_DROP} pts of the baseline with "
                f"executed MACs <= {BAR_MACS}x dense", base - bar_point["top1"] <= BAR_DROP
                and bar_point["macs_ratio"] <= BAR_MACS,
                f"top-1 {bar_point['top1']:.2f} vs {base:.2f} "
                f"({bar_point['top1'] - base:+.2f}), MACs {bar_point['macs_ratio']:.3f}x "
                f"over the 10,000 test images, stages x epochs "
                f"{stages_text(len(bar_point['stages']), args.epochs, bar_point['final_epochs'])}"
                f" of "
                f"{args.train_limit:,} images")]
    for r in results:
        ok = (verdict(base - r["top1"] <= BAR_DROP and r["macs_ratio"] <= BAR_MACS)
              if r["ratio"] == BAR_RATIO else "")
        lat = r["latency"]
        skip_ratio = lat["gated (skipping)"]["min_ms"] / lat["dense"]["min_ms"]
        rows.append([f"fbs {r['ratio']}",
                     stages_text(len(r["stages"]), r["epochs"], r["final_epochs"]),
                     f"{r['top1']:.2f}", f"{r['top1'] - base:+.2f}",
                     f"{r['macs_executed'] / 1e6:.2f}M", f"{r['macs_ratio']:.3f}",
                     f"{skip_ratio:.2f}x", f"{r['kmeans_bytes']:,} ({r['kmeans_ratio']:.1f}x)",
                     f"{r['kmeans_top1']:.2f}", ok])
        lat_rows.append([f"fbs {r['ratio']}"] + [
            f"{lat[k]['min_ms']:.2f} / {lat[k]['median_ms']:.2f}" for k in lat] + [
            f"{lat['gated (masked)']['min_ms'] / lat['dense']['min_ms']:.2f}x",
            f"{skip_ratio:.2f}x",
            f"{lat['gated (skipping)']['median_ms'] / lat['dense']['median_ms']:.2f}x"])
    detail = [[f"fbs {r['ratio']}", s["ratio"], s["epochs"], s["resumed_from"],
               " / ".join(f"{v:.2f}" for v in s["holdout_by_epoch"]), s["best_epoch"],
               f"{min(s['images_per_s']):.0f}-{max(s['images_per_s']):.0f}"
               if s["images_per_s"] else "-"] for r in results for s in r["stages"]]
    gated = bar_point["counter"].gated_layers()
    per_layer = [[name, "gated" if name in gated else "plain",
                  layer.kept[0][0].item() if layer.kept else "all", layer.dense // 1000,
                  f"{torch.cat(layer.live_inputs).float().mean():.1f}",
                  f"{layer.executed / layer.images / layer.dense:.3f}"]
                 for name, layer in bar_point["counter"].layers.items() if layer.live_inputs]
    gate_sets = gate_settings(recipe)
    which = (f"the default set as changed by `{' '.join(gate_sets)}`" if gate_sets
             else "fbs's default set, every 3x3 block conv")
    missing = [r for r in RATIOS if r not in args.ratios]
    finals = args.final_epochs  # per ratio: the missing ratios' last stages keep --epochs
    if finals is not None and len(finals) > 1:
        finals = [*finals, *[args.epochs] * len(missing)]
    command = ("python tools/bench/fbs.py table --ratios "
               + " ".join(f"{r:g}" for r in (*args.ratios, *missing))
               + f" --epochs {args.epochs} --train-limit {args.train_limit}"
               + ("" if finals is None else " --final-epochs " + " ".join(map(str, finals))))
    not_run = ([f"**Not measured in this run:** ratio {', '.join(f'{r:g}' for r in missing)} "
                f"(`{command}` measures them, resuming the stages trained here from "
                "--workdir)."] if missing else [])
    body = "\n\n".join([
        f"ResNet-20 on CIFAR-10 (`{checkpoint_path('resnet20').name}`), uncompressed baseline "
        f"**{base:.2f}%** top-1 on the 10,000 test images, measured in this run. Every fbs "
        f"row is a packed file (`--method fbs`, recipe {label}: `{' '.join(recipe)}`, "
        "chosen on the held-out split: fbs-select.md) evaluated once on the test images "
        f"with `runtime.load`. Training: train/ minus {HOLDOUT} held-out images (seed "
        f"{SEED}); stages 0.9 -> 0.7 -> ... -> ratio, {args.epochs} epoch(s) each"
        + ("" if args.final_epochs is None else " (the last: the table's stages x epochs)")
        + " of "
        f"{args.train_limit:,} images drawn afresh per epoch, Adam with a cosine "
        "learning rate per stage, each stage keeping its epoch with the best held-out "
        f"top-1; L1 1e-8 on the saliencies. Gated: {bar_point['gated_layers']} convs, "
        f"{which} (the stem conv and the classifier are never gated; this ResNet-20 has no "
        "downsample convs).",
        md_table(["model", "stages x epochs", "top-1", "vs baseline", "MACs / image",
                  "executed / dense", "batch-1 latency (skipping / dense, min)",
                  "fbs+kmeans bytes (ratio)", "fbs+kmeans top-1",
                  f"bar (ratio {BAR_RATIO}: within {BAR_DROP} points, <= {BAR_MACS}x MACs)"],
                 rows),
        *not_run,
        "MACs are counted per test image while the 10,000 images are evaluated "
        "(runtime.gating.MacCounter): a gated conv costs kept output channels x input "
        "channels that are not all zero x 9 x output pixels, plus its predictor "
        "(C_in x C_out); an ungated conv all its output channels x input channels that are "
        "not all zero x 9 x output pixels; the classifier its dense count. A suppressed "
        "channel is exactly zero after its gate (the gate multiplies the BatchNorm output), "
        "so the second conv of each block reads at most k live channels (ReLU zeroes a "
        "whole channel of an image now and then as well: the live-input counts below show "
        "both). Not MACs, and not in the "
        f"count: the gates' mean |x| and top-k comparisons, "
        f"{bar_point['gate_other_ops'] / 1e3:.0f}k operations per image at ratio "
        f"{BAR_RATIO}. fbs+kmeans: the same trained gates, every conv, classifier and "
        "predictor weight k-means-clustered (k=32), BatchNorm and biases raw.",
        f"Batch-1 CPU latency, ms per image (min / median of {args.rounds} interleaved "
        f"rounds over the same {args.latency_images} test images, torch "
        f"{torch.get_num_threads()} threads, BatchNorm folded in every form):",
        md_table(["point", "dense", "gated (masked)", "gated (skipping)",
                  "masked / dense (min)", "skipping / dense (min)",
                  "skipping / dense (median)"], lat_rows),
        "The masked form is what `runtime.load` and the ONNX export run: every channel is "
        "computed and the suppressed ones are multiplied by zero, so it pays the gates "
        "and saves nothing. The skipping form computes only the kept filters on the live "
        "inputs; what it pays instead is per-image, per-layer work that a dense batch does "
        "not do (pooling, the predictor, a sort, two index gathers of the weights, one of "
        "the input, a scatter of the output), each a separate small torch call.",
        f"Per conv at ratio {BAR_RATIO} (test images): gated or not, kept outputs k, dense "
        "kMACs, mean live inputs, executed / dense:",
        md_table(["conv", "gate", "k", "dense kMACs", "live inputs (mean)",
                  "executed / dense"], per_layer),
        f"What the gates keep, ratio {BAR_RATIO} (![histograms](fbs-kept.png)): every image "
        f"keeps exactly k output channels per gated conv (the top-k rule), so the variation "
        f"is in the inputs: {HISTOGRAM_LAYER} reads {figure['live_min']} to "
        f"{figure['live_max']} live channels (mean {figure['live_mean']:.1f}), and an "
        f"image executes {figure['per_image_min']:.3f} to {figure['per_image_max']:.3f} of "
        f"the dense MACs (5th-95th percentile {figure['per_image_p5']:.3f}-"
        f"{figure['per_image_p95']:.3f}). In {FREQUENCY_LAYER}, {figure['always_kept']} of "
        f"{figure['channels']} channels are kept for every test image and "
        f"{figure['never_kept']} for none.",
        "Training detail (held-out top-1 after each epoch of each stage; a stage resumed "
        "from its checkpoint shows the epochs it had; images/s on this shared 2-core "
        "machine):",
        md_table(["point", "stage ratio", "epochs", "resumed from", "held-out top-1 by epoch",
                  "best epoch", "images/s"], detail),
        "The longer schedule (the reference trains each stage up to 100 epochs), not run "
        "here: `packer compress resnet20-cifar10jpg.pth -o r20-fbs.fb --method fbs+kmeans "
        "--cifar10 ../shared/data/cifar10 --set ratio=0.5 --set epochs=30 "
        f"--set holdout={HOLDOUT} --set {' --set '.join(recipe)} --set checkpoint=ck/fbs` "
        "(about 90 epochs: some 3 hours on this machine's 2 cores alone, minutes on a GPU).",
    ])
    return body, bars


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="held-out selection of the training recipe")
    s.add_argument("--epochs", type=int, default=1, help="per stage")
    s.add_argument("--train-limit", type=int, default=15000, help="images per epoch")
    s.add_argument("--val-limit", type=int, default=HOLDOUT,
                   help="held-out images that pick each stage's best epoch (the final score "
                        f"uses all {HOLDOUT})")
    t = sub.add_parser("table", help="the chosen recipe at ratios 0.7, 0.5, 0.3, on test")
    tr = sub.add_parser("train", help="train table's points, print held-out curves only "
                                      "(test not read, docs/results left alone)")
    for p in (t, tr):
        _table_args(p)
    for p in (s, t, tr):
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--lock", default="/tmp/wp-heavy.lock",
                       help="flock file taken per point ('' for none)")
        add_results_args(p)
    args = parser.parse_args()
    refuse_dirty_tree(args.allow_dirty)
    setup_torch(args.threads)
    command = "python tools/bench/fbs.py " + shlex.join(sys.argv[1:])
    if args.command == "train":
        print(train(args))
        return 0
    if args.command == "select":
        name, title, body, bars = ("fbs-select", "FBS: held-out selection of the recipe",
                                   select(args), [])
    else:
        name, title = "fbs", "FBS channel gating on ResNet-20"
        body, bars = table(args)
    if args.no_write:
        print(body)
    else:
        print(write_results(name, title, command, body, bars))
    return BAR_FAILED if any(not b.ok for b in bars) else 0


def _table_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--epochs", type=int, default=5, help="per stage")
    t.add_argument("--final-epochs", type=int, nargs="+", default=None, metavar="N",
                   help="epochs of each point's last stage (default: --epochs): one count, or "
                        "one per --ratios entry; the earlier stages, shared between points, "
                        "keep --epochs")
    t.add_argument("--train-limit", type=int, default=45000,
                   help="training images per epoch (drawn afresh each epoch)")
    t.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS),
                   help=f"keep ratios to measure, in order; must include {BAR_RATIO}")
    t.add_argument("--workdir", default="/tmp/fbs-bench",
                   help="packed files and stage checkpoints (kept: a rerun resumes)")
    t.add_argument("--rounds", type=int, default=9, help="latency rounds")
    t.add_argument("--latency-images", type=int, default=64)


if __name__ == "__main__":
    raise SystemExit(main())
