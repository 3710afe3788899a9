"""Size budgets on the shared CIFAR ResNets: top-1 against true file bytes, beside NNCodec.

    python tools/bench/budget.py validate   # choices, on held-out train images
    python tools/bench/budget.py curve      # the reported curve, on the 10,000 test images

`validate` packs ResNet-20 variants (clip rule, sensitivity measure, repairs, raw fp16,
AdaRound step size and length, kmeans; `rdo` at fixed bit widths; post-training WFN with
and without calibration data) and measures top-1 on HOLDOUT training images that are
disjoint from the calibration images: every setting of the curve is chosen there
(docs/results/budget-validation.md). `curve` packs each model at each target ratio with
nearest rounding and with AdaRound using those settings and measures top-1 once on the
10,000 test images (docs/results/budget.md and budget.png, with NNCodec's quoted ResNet-20
points on the same axes). Calibration images always come from train/ (`--calib-data` is the
CIFAR-10 root, whose train/ split the packer uses); each row states how many and the seconds
they cost (loading, sensitivity, AdaRound, repair, summed over the budget's builds).
"""

from __future__ import annotations

import packer  # noqa: F401  first: it sets the OpenMP wait policy, read when torch loads

# isort: split
import argparse
import fnmatch
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    BAR_FAILED,
    RESULTS_DIR,
    Bar,
    checkpoint_path,
    md_table,
    refuse_dirty_tree,
    setup_torch,
    shared_dir,
    write_results,
)
from _eval import ImageSet, load_fp32, standard_error, test_set, top1
from accuracy import quoted_baselines

import runtime
from packer.compress import PackRequest, pack
from packer.ptq.calib import load_calibration
from runtime import zoo
from runtime.errors import ConfigError

RATIOS = (6.5, 8.5, 10.9, 13.0, 15.0, 20.0)
BASELINE_R20 = 88.25
BARS = ((10.9, 87.4), (15.0, 85.0))  # ResNet-20: at >= ratio, top-1 >= value
# Settings of every curve point, chosen on the validation split (docs/results/
# budget-validation.md): MSE clipping, raw tensors (BatchNorm, biases) at fp16.
VALIDATION_JSON = RESULTS_DIR / "budget-validation.json"
CURVE_JSON = RESULTS_DIR / "budget-curve.json"


@dataclass
class Point:
    model: str
    label: str
    method: str = "uniform"
    sets: tuple[str, ...] = ()
    ratio: float | None = None
    request: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    """Images and labels the packed files are measured on, decoded once."""

    name: str
    data: ImageSet


def holdout_set(model: str, calib_images: int, holdout: int, seed: int) -> EvalSet:
    """Training images disjoint from the calibration images the packer draws (same seed,
    same draw: the first `calib_images` calibrate, the next `holdout` validate)."""
    cal = load_calibration(shared_dir() / "data" / "cifar10", zoo.input_spec(f"cifar_{model}"),
                           calib_images, holdout, seed)
    assert cal.holdout is not None and cal.holdout_labels is not None
    name = f"{cal.holdout.shape[0]} held-out train images"
    return EvalSet(name, ImageSet(cal.holdout, cal.holdout_labels, cal.seconds, name))


def run_point(point: Point, evalset: EvalSet, args: argparse.Namespace, cache: dict,
              baseline: float) -> dict[str, Any] | None:
    request = {"alignment": 8, "calib_data": shared_dir() / "data" / "cifar10",
               "calib_images": args.calib_images, "seed": args.seed, **point.request}
    if point.ratio is not None:
        request["target_ratio"] = point.ratio
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.fb"
        started = time.perf_counter()
        try:
            report = pack(PackRequest(checkpoint_path(point.model), out, method=point.method,
                                      overrides=list(point.sets), progress=False,
                                      budget_cache=cache, **request))
        except ConfigError as exc:  # e.g. a budget below the method's smallest file
            print(json.dumps({"label": point.label, "ratio": point.ratio,
                              "skipped": str(exc)}), flush=True)
            return None
        seconds = time.perf_counter() - started
        acc = top1(runtime.load(out), evalset.data)
    cal = report.get("calibration", {})
    budget = report.get("budget", {})
    option = budget.get("option")
    row = {"model": point.model, "label": point.label, "method": point.method,
           "sets": list(point.sets), "target_ratio": point.ratio,
           "request": {k: v for k, v in point.request.items()},
           "file_bytes": report["file_bytes"], "ratio": round(report["ratio"], 3),
           "top1": round(acc, 2), "delta": round(acc - baseline, 2),
           "calib_images": cal.get("images", 0), "calib_seconds": cal.get("seconds", {}),
           "builds": cal.get("builds"), "pack_seconds": round(seconds, 1),
           "within_window": budget.get("within_window"),
           "rates": [r[option] for r in budget.get("layers", [])] if option else None}
    print(json.dumps(row, default=str), flush=True)
    return row


def baseline_of(model: str, evalset: EvalSet) -> float:
    return top1(load_fp32(model), evalset.data)


# --- validate ----------------------------------------------------------------------------


# Budget variants compared on validation; `choose` turns their rows into the curve's
# settings. Each differs from the reference ("nearest": the step_rms knob, fisher
# sensitivity, repair bn,bias, fp32 raw tensors) in one respect.
HOLDOUT = 5000
"""Held-out training images the validation rows are measured on."""
NEAREST = {
    "nearest": ((), {}),
    "nearest, bits knob clip=mse": (("budget_knob=bits", "clip=mse"), {}),
    "nearest, bits knob clip=max": (("budget_knob=bits", "clip=max"), {}),
    "nearest fp16": (("fp16=true",), {}),
    "nearest, no repair": ((), {"repair": ()}),
    "nearest, repair bn only": ((), {"repair": ("bn",)}),
}
ADAROUND = {
    "adaround (500 steps, lr 1e-2), fp16":
        ("rounding=adaround", "adaround_iters=500", "fp16=true"),
    "adaround (500 steps, lr 1e-2)": ("rounding=adaround", "adaround_iters=500"),
    "adaround (500 steps, lr 1e-2), bits knob clip=mse fp16":
        ("budget_knob=bits", "clip=mse", "fp16=true", "rounding=adaround",
         "adaround_iters=500"),
}
"""Each a whole recipe (the reference's step_rms rate knob unless it says otherwise): the
AdaRound curve uses the chosen one as it was validated, since a rate knob that is best with
nearest rounding need not be best with AdaRound (at 15x on ResNet-20 the step_rms knob is
the worst with nearest rounding and the best with AdaRound). The first is the reference:
fp16 raw tensors, which the nearest rows chose. 500 steps per layer is what this bench's
CPU time allows (the option's default is 2000); longer runs were not compared."""


def validation_points(ratios: Sequence[float]) -> list[Point]:
    m = "resnet20"
    pts: list[Point] = []
    for r in ratios:
        pts += [Point(m, label, sets=sets, ratio=r, request=dict(req))
                for label, (sets, req) in NEAREST.items()]
        if r < 13:  # kmeans' smallest file (k=4 everywhere) is about 13.5x
            pts.append(Point(m, "kmeans", method="kmeans", ratio=r))
    pts += [Point(m, label, sets=sets, ratio=r) for r in ratios
            for label, sets in ADAROUND.items()]
    for bits in (3, 4, 5):
        for rounding in ("nearest", "rdo"):
            pts.append(Point(m, f"uniform {bits}b clip=max rounding={rounding} (rdo 0.1), "
                             f"no repair", sets=(f"bits={bits}", "clip=max",
                                                 f"rounding={rounding}"),
                             request={"repair": ()}))
    for method, sets in (("int8", ()), ("uniform", ("bits=5", "clip=mse")),
                         ("uniform", ("bits=4", "clip=mse"))):
        for repair in ((), ("bn",), ("bn", "bias")):
            pts.append(Point(m, f"{method} {' '.join(sets)} repair {'+'.join(repair) or 'none'}",
                             method=method, sets=sets, request={"repair": repair}))
    for delta in (0.0075, 0.02):
        for calib in (False, True):
            pts.append(Point(m, f"wfn post-training delta={delta}, "
                             f"{'--calib-data (BN re-estimated)' if calib else 'no data'}",
                             method="wfn", sets=("fixing_epochs=0",
                                                 f"distance_allowed={delta}"),
                             request={} if calib else {"calib_data": None}))
    return pts


def sensitivity_check(args: argparse.Namespace) -> tuple[str, list[list[Any]]]:
    """Fisher estimate against the measured output KL, every ResNet-20 layer alone at 2, 3
    and 4 bits (clip=mse), on the calibration images the packer would draw."""
    from packer.methods.uniform import quantize_symmetric
    from packer.ptq.sensitivity import _kl, _logprobs
    from packer.ptq.stats import fisher_quadratics

    cal = load_calibration(shared_dir() / "data" / "cifar10", zoo.input_spec("cifar_resnet20"),
                           args.calib_images, 0, args.seed)
    model = load_fp32("resnet20")
    batches = list(cal.batches())
    layers = [n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bits = (2, 3, 4)
    deltas = {}
    for layer in layers:
        w = model.get_submodule(layer).weight.detach()
        deltas[layer] = [quantize_symmetric(w, b, clip="mse").dequantize() - w for b in bits]
    started = time.perf_counter()
    stats: dict[str, float] = {}
    fisher = fisher_quadratics(model, deltas, batches, stats)
    fisher_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = _logprobs(model, batches)
    rows = []
    for layer in layers:
        weight = model.get_submodule(layer).weight
        saved = weight.detach().clone()
        measured = []
        for d in deltas[layer]:
            with torch.no_grad():
                weight.copy_(saved + d)
            measured.append(_kl(model, batches, reference))
        with torch.no_grad():
            weight.copy_(saved)
        rows.append([layer, *(f"{f:.3g} / {m:.3g}" for f, m in zip(fisher[layer], measured,
                                                                    strict=True))])
        print(json.dumps({"layer": layer, "fisher": fisher[layer], "kl": measured}), flush=True)
    kl_s = time.perf_counter() - started
    block_s = block_step_seconds(model, batches[0][:32])
    note = (f"Per-layer sensitivity on {cal.images.shape[0]} calibration images: `fisher` "
            f"estimate / measured output KL (nats per image), each layer alone at 2, 3, 4 bits "
            f"(`clip=mse`). Fisher: {fisher_s:.0f} s for all 60 candidates (probability mass "
            f"outside each image's top-4 classes: {stats['mass_left_out']:.2g}); measured: "
            f"{kl_s:.0f} s. For BRECQ-style block reconstruction: one forward and backward "
            f"pass of ResNet-20's block layer1.0 on 32 images takes {1000 * block_s:.0f} ms "
            f"here (median of 20), what each of its optimisation steps would cost.")
    return note, rows


def block_step_seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Median time of one forward + backward pass through layer1.0 on `images`."""
    import statistics

    stem = torch.nn.functional.relu(model.bn1(model.conv1(images))).detach()
    block = model.layer1[0]
    times = []
    for _ in range(20):
        start = time.perf_counter()
        out = block(stem.requires_grad_(True))
        out.square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def validate(args: argparse.Namespace) -> None:
    evalset = holdout_set("resnet20", args.calib_images, args.holdout, args.seed)
    baseline = baseline_of("resnet20", evalset)
    points = [p for p in validation_points(args.ratios)
              if not args.only or any(fnmatch.fnmatchcase(p.label, s) for s in args.only)]
    cache: dict = {}
    rows = [{**r, "evalset": evalset.name, "commit": git_head()}
            for p in points if (r := run_point(p, evalset, args, cache, baseline))]
    sens = sensitivity_check(args) if args.sensitivity_check else None
    if args.no_write:
        return
    # Validation is measured a few labels per locked job: rows of points not run now stay,
    # when they were measured on the same split.
    if VALIDATION_JSON.is_file() and args.only:
        done = {(r["label"], r["target_ratio"]) for r in rows}
        kept = [r for r in json.loads(VALIDATION_JSON.read_text())
                if (r["label"], r["target_ratio"]) not in done
                and r.get("evalset") == evalset.name and r.get("calib_images") in (
                    args.calib_images, 0)]
        order = {p.label: i for i, p in enumerate(validation_points(args.ratios))}
        rows = sorted(kept + rows, key=lambda r: (order.get(r["label"], 1 << 20),
                                                 r["target_ratio"] or 0))
    body = [f"ResNet-20 (resnet20-cifar10jpg.pth), top-1 on {evalset.name} (seed "
            f"{args.seed}; full precision: {baseline:.2f}), disjoint from the "
            f"{args.calib_images} calibration images. Every row is a real packed file "
            f"(alignment 8); `target` rows are sized by `--target-ratio`.", "",
            table(rows, validation=True)]
    if sens is not None:
        body += ["", "## Sensitivity: Fisher estimate against measured KL", "", sens[0], "",
                 md_table(["layer", "2 bits", "3 bits", "4 bits"], sens[1])]
    VALIDATION_JSON.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    nearest, ada, request, why = choose(rows)
    body += ["", "## What the curve uses (`choose()` in tools/bench/budget.py)", "",
             f"- nearest rounding: `{' '.join(nearest)}`, request `{request}`",
             f"- AdaRound: `{' '.join(ada)}`", *[f"- {w}" for w in why], "",
             "The rows are also in budget-validation.json, which `budget.py curve` reads."]
    write_results("budget-validation", "Size budgets: choices on a validation split",
                  shlex.join(["python", "tools/bench/budget.py", *sys.argv[1:]]),
                  "\n".join(body))


# --- curve -------------------------------------------------------------------------------


def choose(rows: list[dict[str, Any]]
           ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any], list[str]]:
    """The curve's settings from the validation rows: each choice is the first variant (in
    the order listed, reference first) whose mean held-out top-1, over the target ratios
    every compared variant was measured at (its own ratios where they share none), is
    within one standard error of the best: a variant ahead by less is noise, and choosing
    on noise would only move the reported curve."""
    def ratios_of(label: str) -> set[float]:
        return {r["target_ratio"] for r in rows if r["label"] == label and r["target_ratio"]}

    def mean(label: str, at: set[float] | None = None) -> float | None:
        got = [r["top1"] for r in rows if r["label"] == label and r["target_ratio"]
               and (at is None or r["target_ratio"] in at)]
        return sum(got) / len(got) if got else None

    def best(labels: Sequence[str]) -> str:
        measured = [lab for lab in labels if ratios_of(lab)]
        if not measured:
            raise SystemExit("budget-validation.json lacks the rows to choose from; run "
                             "`budget.py validate` first")
        common = set.intersection(*(ratios_of(lab) for lab in measured)) or None
        means = {lab: mean(lab, common) for lab in measured}
        top = max(means.values())
        return next(lab for lab in measured if means[lab] >= top - standard_error(top, HOLDOUT))

    why = []
    knob = best(["nearest", "nearest, bits knob clip=mse", "nearest, bits knob clip=max"])
    sets = list(NEAREST[knob][0])
    raw = best(["nearest", "nearest fp16"])
    sets += NEAREST[raw][0]
    repair = best(["nearest", "nearest, repair bn only", "nearest, no repair"])
    request = dict(NEAREST[repair][1])
    for what, got in (("rate knob", knob), ("raw tensors", raw), ("repair", repair)):
        why.append(f"{what}: `{got}` (mean held-out top-1 {mean(got):.2f})")
    ada_label = best(list(ADAROUND))
    why.append(f"AdaRound: `{ada_label}` (mean held-out top-1 {mean(ada_label):.2f}), as "
               "validated")
    return tuple(sets), ADAROUND[ada_label], request, why


def kmeans_helps(rows: list[dict[str, Any]]) -> bool:
    """Did kmeans beat the nearest-rounding reference at any ratio on validation?"""
    ref = {r["target_ratio"]: r["top1"] for r in rows if r["label"] == "nearest"}
    return any(r["top1"] > ref.get(r["target_ratio"], 101.0) for r in rows
               if r["label"] == "kmeans")


def curve_points(models: Sequence[str], ratios: Sequence[float], kmeans: bool,
                 iters: dict[str, int], chosen: tuple) -> list[Point]:
    nearest, ada, request, _ = chosen
    raw16 = ("fp16=true",) if "fp16=true" in nearest else ()
    pts = []
    for m in models:
        for r in ratios:
            pts.append(Point(m, "uniform, nearest", sets=nearest, ratio=r, request=request))
            sets = tuple(s for s in ada if not s.startswith("adaround_iters="))
            if m in iters:
                sets = (*sets, f"adaround_iters={iters[m]}")
            pts.append(Point(m, "uniform, adaround", sets=sets if m in iters else ada, ratio=r,
                             request=request))
            if kmeans:
                pts.append(Point(m, "kmeans", method="kmeans", sets=raw16, ratio=r,
                                 request=request))
    return pts


def curve(args: argparse.Namespace) -> bool:
    """Measure the points of `args.models` into budget-curve.json (other models' rows stay),
    then render budget.md and budget.png from every model there."""
    iters = dict(i.split("=") for i in args.adaround_iters)
    if not VALIDATION_JSON.is_file():
        raise SystemExit(f"{VALIDATION_JSON} not found: run `budget.py validate` first")
    validation = json.loads(VALIDATION_JSON.read_text())
    chosen = choose(validation)
    kmeans = args.kmeans == "yes" or (args.kmeans == "auto" and kmeans_helps(validation))
    store = json.loads(CURVE_JSON.read_text()) if CURVE_JSON.is_file() else {}
    command = shlex.join(["python", "tools/bench/budget.py", *sys.argv[1:]])
    commit = git_head()
    for model in args.models:
        test = EvalSet("10,000 test images", test_set(f"cifar_{model}"))
        baseline = baseline_of(model, test)
        settings = {"baseline": baseline, "calib_images": args.calib_images, "seed": args.seed,
                    "adaround_iters": iters.get(model),
                    "chosen": [list(chosen[0]), list(chosen[1]), chosen[2]]}
        settings = json.loads(json.dumps(settings, default=str))  # as stored
        old = store.get(model, {})
        # Rows of other ratios or labels stay when they were measured under the same settings
        # (a curve is measured a few ratios per locked job); a point measured again replaces
        # its row.
        same = {k: old.get(k) for k in settings} == settings
        rows = [r for r in old.get("rows", []) if same]
        skipped = [s for s in old.get("skipped", []) if same]
        commands = [c for c in old.get("commands", []) if same]
        cache: dict = {}
        for p in curve_points([model], args.ratios, kmeans,
                              {k: int(v) for k, v in iters.items()}, chosen):
            if args.labels and not any(fnmatch.fnmatchcase(p.label, s) for s in args.labels):
                continue
            rows = [r for r in rows if (r["label"], r["target_ratio"]) != (p.label, p.ratio)]
            row = run_point(p, test, args, cache, baseline)
            if row is None:
                skipped.append(f"{model} {p.label} at {p.ratio}x: not packed (the budget is "
                               f"below that method's smallest file)")
            else:
                rows.append({**row, "commit": commit})
        rows.sort(key=lambda r: (r["label"], r["target_ratio"]))
        store[model] = {**settings, "commands": list(dict.fromkeys([*commands, command])),
                        "rows": rows, "skipped": list(dict.fromkeys(skipped))}
    if args.no_write:
        return True
    CURVE_JSON.write_text(json.dumps(store, indent=1, default=str) + "\n")
    return render(store)


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(store: dict[str, Any]) -> bool:
    models = [m for m in ("resnet20", "resnet56") if m in store]
    rows = [r for m in models for r in store[m]["rows"]]
    baselines = {m: store[m]["baseline"] for m in models}
    _, quoted = quoted_baselines()
    plot(rows, baselines, quoted, RESULTS_DIR / "budget.png")
    bars = check_bars(rows)
    setup = []
    for m in models:
        st = store[m]
        nearest, ada, request = st["chosen"]
        setup.append(f"- {m}: {st['calib_images']} calibration images drawn from train/ with "
                     f"seed {st['seed']}; nearest `{' '.join(nearest)}`, AdaRound "
                     f"`{' '.join(ada)}`" + (f", {request}" if request else "")
                     + (f", AdaRound steps per layer {st['adaround_iters']} (CPU time)"
                        if st["adaround_iters"] else "")
                     + f"; full precision measured here {st['baseline']:.2f}; measured by "
                     + "; ".join(f"`{c}`" for c in st["commands"])
                     + " (each row's commit is in budget-curve.json)")
    lines = ["Top-1 on the 10,000 CIFAR-10 test images against true file bytes (bytes on "
             "disk) of `packer compress --method uniform --target-ratio R --calib-data "
             "<cifar10 root> --alignment 8`, settings chosen on a validation split of train/ "
             "([budget-validation.md](budget-validation.md)):", "", *setup, "",
             "![top-1 against file bytes](budget.png)", ""]
    lines += ["## Points", "", table(rows, validation=False), "",
              *[f"- {s}" for m in models for s in store[m]["skipped"]], "",
              "NNCodec rows are quoted from `shared/models/cifar10/BASELINES.md` (NNCodec 2.1.3, "
              "its whole bitstream), not measured here.", "",
              md_table(["NNCodec QP (quoted)", "bytes", "ratio", "top-1"],
                       [[q.qp, f"{q.file_bytes:,}", q.ratio, q.top1] for q in quoted]), "",
              "Calibration seconds = decoding the calibration images + sensitivity "
              "(every candidate's quantization, AdaRound for coarse AdaRound candidates, "
              "encoding, and the Fisher pass) + AdaRound + BatchNorm re-estimation and bias "
              "correction, summed over the budget's builds (`builds`: files built until one "
              "landed within 1% under the target). A model's sensitivity is measured once and "
              "reused by its later points (`PackRequest.budget_cache`), so their pack s "
              "excludes it while their calibration seconds include it (what a single run "
              "pays)."]
    commands = "; ".join(dict.fromkeys(c for m in models for c in store[m]["commands"]))
    write_results("budget", "Size budgets: top-1 against file bytes", commands,
                  "\n".join(lines), bars)
    return all(b.ok for b in bars)


def check_bars(rows: list[dict[str, Any]]) -> list[Bar]:
    """Issue 13's ResNet-20 bars: the best measured point at or above each ratio."""
    out = []
    r20 = [r for r in rows if r["model"] == "resnet20"]
    for ratio, want in BARS:
        over = [r for r in r20 if r["ratio"] >= ratio]
        best = max(over, key=lambda r: r["top1"], default=None)
        name = f"resnet20 budget at >= {ratio}x: top-1 >= {want} on 10,000 test images"
        if best is None:
            out.append(Bar(name, False, "no point measured at that ratio"))
        else:
            out.append(Bar(name, best["top1"] >= want,
                           f"best {best['top1']:.2f} ({best['label']}, "
                           f"{best['file_bytes']:,} B, {best['ratio']:.2f}x)"))
    return out


def table(rows: list[dict[str, Any]], validation: bool) -> str:
    headers = ["model", "point", "target", "file bytes", "ratio", "top-1", "delta",
               "calib images", "calib s", "builds", "pack s", "per-layer rates"]
    body = []
    for r in rows:
        cal = r["calib_seconds"] or {}
        body.append([r["model"], r["label"] + ("" if not r["sets"] else
                                               f" (`{' '.join(r['sets'])}`)"),
                     f"{r['target_ratio']}x" if r["target_ratio"] else "-",
                     f"{r['file_bytes']:,}", f"{r['ratio']:.2f}", f"{r['top1']:.2f}",
                     f"{r['delta']:+.2f}", r["calib_images"],
                     f"{cal.get('total', 0):.0f}", r["builds"] or "-", f"{r['pack_seconds']:.0f}",
                     " ".join(map(str, r["rates"])) if r["rates"] else "-"])
    return md_table(headers, body)


def plot(rows: list[dict[str, Any]], baselines: dict[str, float], quoted, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(baselines)
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    styles = {"uniform, nearest": ("o-", "C0"), "uniform, adaround": ("s-", "C1"),
              "kmeans": ("^-", "C2")}
    for ax, model in zip(axes[0], models, strict=True):
        for label, (marker, colour) in styles.items():
            pts = sorted((r["file_bytes"], r["top1"]) for r in rows
                         if r["model"] == model and r["label"] == label)
            if pts:
                ax.plot([b / 1000 for b, _ in pts], [t for _, t in pts], marker, color=colour,
                        label=f"weightpack {label}")
        if model == "resnet20":
            ax.plot([q.file_bytes / 1000 for q in quoted], [q.top1 for q in quoted], "x--",
                    color="C3", label="NNCodec 2.1.3 (quoted)")
        ax.axhline(baselines[model], color="grey", lw=0.8, ls=":",
                   label=f"full precision {baselines[model]:.2f}")
        ax.set_title(f"{model}-cifar10jpg.pth, 10,000 test images")
        ax.set_xlabel("file bytes on disk (KB)")
        ax.set_ylabel("top-1 (%)")
        lows = [r["top1"] for r in rows if r["model"] == model]
        if model == "resnet20":
            lows += [q.top1 for q in quoted]
        ax.set_ylim(max(min(lows + [baselines[model]]) - 2, 60), baselines[model] + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="choices on held-out train images")
    v.add_argument("--ratios", type=float, nargs="+", default=[10.9, 15.0])
    v.add_argument("--holdout", type=int, default=HOLDOUT)
    v.add_argument("--only", nargs="*", metavar="LABEL",
                   help="run only the points whose label matches one of these (shell "
                   "wildcards: 'uniform *')")
    v.add_argument("--sensitivity-check", action="store_true",
                   help="also compare the Fisher estimate with the measured KL per layer")
    c = sub.add_parser("curve", help="the reported curve on the test images")
    c.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    c.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    c.add_argument("--kmeans", choices=("auto", "yes", "no"), default="auto",
                   help="kmeans rows too (auto: when kmeans beat uniform nearest rounding "
                   "at some ratio on the validation split)")
    c.add_argument("--labels", nargs="*", metavar="LABEL",
                   help="measure only these curve points ('uniform, nearest', 'uniform, "
                   "adaround', 'kmeans'; shell wildcards); rows measured before stay")
    c.add_argument("--adaround-iters", nargs="*", default=[], metavar="MODEL=N",
                   help="AdaRound steps per layer for a model (default: the option's)")
    for p in (v, c):
        p.add_argument("--calib-images", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-write", action="store_true",
                       help="print rows only (sizing runs); no results file")
        p.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    setup_torch()
    torch.manual_seed(0)
    if args.command == "validate":
        validate(args)
        return 0
    return 0 if curve(args) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
