"""Prune -> k-means -> int8 on the shared CIFAR-10 ResNets, and the sparse coder table.

    python tools/bench/prune.py select    # recipe choices, on held-out train images
    python tools/bench/prune.py grid      # density x criterion, then + k-means K, +/- fine-tuning
    python tools/bench/prune.py bar       # the chained prune+kmeans+int8 point, end to end
    python tools/bench/prune.py report    # docs/results/prune.md and sparse_coding.md
    python tools/bench/prune.py all       # the four in order (what the docs' figures come from)
    python tools/bench/prune.py coding    # sparse_coding.md alone, from post-training magnitude
                                          # points (no training, no test images: minutes)

Every point is a real packed file (packer.compress.pack): `file_bytes` are bytes on disk,
`ratio` is fp32 bytes / file bytes, and top-1 is measured once on the 10,000 test images by
loading that file with the runtime. Every choice is made on images held out of train/
(`--holdout`, default 5,000), never on test: `select` fine-tunes magnitude-pruned models
(density 0.2, one epoch) with each candidate recipe, and `grid` and `bar` then use the
winners (`choices`), as they use the epoch fit() keeps by the same held-out images.
Finished points are kept in `--workdir`/state.json, so an interrupted run resumes.

The k-means points start from the pruned file of their grid row (its decoded weights saved as
a checkpoint) instead of pruning again: `prune+kmeans` hands k-means exactly those weights, so
the figures are the chain's (the bar point runs the real chain end to end).
"""

from __future__ import annotations

import packer  # noqa: F401  first: it sets the OpenMP wait policy, read when torch loads

# isort: split
import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    MODELS,
    Bar,
    arch_of,
    checkpoint_path,
    md_table,
    refuse_dirty_tree,
    setup_torch,
    shared_dir,
    write_results,
)

from packer.compress import PackRequest, pack
from packer.training import DataSpec
from runtime import coders, load, zoo
from runtime.atomic import atomic_write
from runtime.data import cifar10_dataset, make_loader
from runtime.decode import read_stream
from runtime.evaluate import evaluate
from runtime.format.reader import open_packed
from runtime.report import tensor_row

CRITERIA = ("magnitude", "snip", "ecs")
DENSITIES = (0.5, 0.2, 0.1)
KS = (8, 16, 32)
PRUNE_RECIPES = {  # fine-tuning after pruning: `select` keeps the best on held-out images
    "sgd-0.01": ("optimizer=sgd", "lr=0.01", "weight_decay=0.0005"),
    "sgd-0.05": ("optimizer=sgd", "lr=0.05", "weight_decay=0.0005"),
    "adam-0.001": ("optimizer=adam", "lr=0.001", "weight_decay=0"),
}
KMEANS_RECIPES = {  # centroid fine-tuning by gradient sharing
    "adam-0.0001": ("optimizer=adam", "lr=0.0001", "weight_decay=0"),
    "adam-0.001": ("optimizer=adam", "lr=0.001", "weight_decay=0"),
}


# --- state ----------------------------------------------------------------------------------


class State:
    """Finished points by key, written through after each one (resume after a crash)."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "state.json"
        self.data: dict[str, Any] = (json.loads(self.path.read_text())
                                     if self.path.is_file() else {})

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        self.data[key] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)
        print(json.dumps({"key": key, **{k: row.get(k) for k in (
            "file_bytes", "ratio", "top1", "holdout_top1", "pack_s")}}), flush=True)


def once(state: State, key: str, make: Callable[[], dict[str, Any]],
         test: Callable[[], float] | None = None) -> dict[str, Any]:
    """The point's row, made if missing; `test` (when given) adds its test top-1 if the row was
    made without it (by `coding`, which needs only the files)."""
    row = state.get(key)
    if row is None:
        row = make()
        state.put(key, row)
    if test is not None and row.get("top1") is None:
        started = time.perf_counter()
        row["top1"] = test()
        row["eval_s"] = round(time.perf_counter() - started, 1)
        state.put(key, row)
    return row


# --- measuring --------------------------------------------------------------------------------


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec("cifar10", shared_dir() / "data" / "cifar10", batch_size=args.batch_size,
                    workers=args.workers)


def test_top1(path: Path, args: argparse.Namespace, checkpoint: bool = False) -> float:
    """Top-1 on the 10,000 test images of the packed file (or of a checkpoint)."""
    if checkpoint:
        model = zoo.build(arch_of(args.model))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        model = load(path)
    test = cifar10_dataset(shared_dir() / "data" / "cifar10", "test")
    return round(evaluate(model.eval(), make_loader(test, 500, args.workers, args.test_limit),
                          progress=False).top1, 2)


def pack_point(source: Path, out: Path, method: str, sets: list[str],
               args: argparse.Namespace, evaluate_test: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    report = pack(PackRequest(source, out, method, overrides=sets, progress=False,
                              data=data_spec(args), seed=args.seed,
                              alignment=args.alignment))
    pack_s = time.perf_counter() - started
    fine = [report.get("prune", {}).get("finetune"), report.get("kmeans_finetune")]
    holdout = [f["best_top1"] for f in fine if f]
    row = {"method": method, "settings": sets, "file": str(out),
           "file_bytes": report["file_bytes"],
           "ratio": round(report["ratio"], 2), "bits_per_weight": weight_bits(out),
           "holdout_top1": round(holdout[-1], 2) if holdout else None,
           "finetune": [f and {k: f[k] for k in ("epochs_run", "best_epoch", "start_top1",
                                                  "best_top1", "seconds", "history")}
                        for f in fine],
           "pack_s": round(pack_s, 1)}
    if "prune" in report:
        row["density"] = report["prune"]["density"]
    if evaluate_test:
        started = time.perf_counter()
        row["top1"] = test_top1(out, args)
        row["eval_s"] = round(time.perf_counter() - started, 1)
    return row


def weight_bits(path: Path) -> float:
    """Stored bits per Conv/Linear weight (streams and codebooks), raw or compressed alike."""
    with open_packed(path) as packed:
        rows = [tensor_row(t) for t in packed.model.tensors
                if t.name.endswith("weight") and len(t.shape) in (2, 4)]
    return round(8 * sum(r["coded_bytes"] for r in rows) / sum(r["numel"] for r in rows), 3)


def pruned_checkpoint(fb: Path) -> Path:
    """The pruned file's decoded weights as a checkpoint k-means can start from."""
    ckpt = fb.with_suffix(".pth")
    if not ckpt.exists():  # written whole or not at all: a killed run must not leave half
        buffer = io.BytesIO()
        torch.save(load(fb).state_dict(), buffer)
        atomic_write(ckpt, [buffer.getvalue()])
    return ckpt


def baseline(state: State, args: argparse.Namespace) -> dict[str, Any]:
    def make() -> dict[str, Any]:
        return {"top1": test_top1(checkpoint_path(args.model), args, checkpoint=True)}
    return once(state, f"{args.model}/baseline", make)


def prune_point(state: State, args: argparse.Namespace, criterion: str, density: float,
                epochs: int, recipe: tuple[str, ...], tag: str = "",
                evaluate_test: bool = True) -> dict[str, Any]:
    key = f"{args.model}/prune/{criterion}/{density}/{epochs}{tag}"
    out = args.workdir / (key.replace("/", "-") + ".fb")
    sets = [f"criterion={criterion}", f"density={density}", f"finetune_epochs={epochs}",
            f"holdout={args.holdout}", f"ecs_warmup_epochs={args.ecs_warmup}",
            f"train_limit={args.prune_train_limit}", *recipe]
    row = once(state, key, lambda: pack_point(checkpoint_path(args.model), out, "prune", sets,
                                              args, evaluate_test=False),
               (lambda: test_top1(out, args)) if evaluate_test else None)
    row["file"] = str(out)
    return row


def kmeans_point(state: State, args: argparse.Namespace, pruned: dict[str, Any], k: int,
                 epochs: int, recipe: tuple[str, ...], tag: str = "",
                 evaluate_test: bool = True) -> dict[str, Any]:
    source = pruned_checkpoint(Path(pruned["file"]))
    key = f"{Path(pruned['file']).stem}/kmeans/{k}/{epochs}{tag}"
    out = args.workdir / (key.replace("/", "-") + ".fb")
    sets = [f"k={k}", f"finetune_epochs={epochs}", f"holdout={args.holdout}",
            f"train_limit={args.kmeans_train_limit if epochs else 0}", *recipe]
    row = once(state, key, lambda: pack_point(source, out, "kmeans", sets, args,
                                              evaluate_test=False),
               (lambda: test_top1(out, args)) if evaluate_test else None)
    row["file"] = str(out)
    return row


# --- modes ------------------------------------------------------------------------------------


SELECT_DENSITY, SELECT_EPOCHS = 0.2, 1


def select(state: State, args: argparse.Namespace) -> dict[str, Any]:
    """Candidate recipes, each judged by its best held-out top-1 after one short fine-tune;
    returns the winners (ties: the earlier candidate)."""
    def held_out(row: dict[str, Any]) -> float:
        return row["holdout_top1"]

    def prune(recipe: tuple[str, ...], tag: str) -> dict[str, Any]:
        return prune_point(state, args, "magnitude", SELECT_DENSITY, SELECT_EPOCHS, recipe,
                           f"/select-{tag}", evaluate_test=False)

    rows = {name: prune(recipe, name) for name, recipe in PRUNE_RECIPES.items()}
    best = max(rows, key=lambda n: held_out(rows[n]))
    recipe = PRUNE_RECIPES[best]
    distill = prune((*recipe, "distill=true"), f"{best}-distill")
    layerwise = prune((*recipe, "scope=layerwise"), f"{best}-layerwise")
    pruned = rows[best]
    kmeans = {name: kmeans_point(state, args, pruned, 16, 1, recipe_k, f"/select-{name}",
                                 evaluate_test=False)
              for name, recipe_k in KMEANS_RECIPES.items()}
    kmeans_best = max(kmeans, key=lambda n: held_out(kmeans[n]))
    return {"prune": best, "distill": held_out(distill) > held_out(pruned),
            "scope": "layerwise" if held_out(layerwise) > held_out(pruned) else "global",
            "kmeans": kmeans_best}


def trains(args: argparse.Namespace) -> bool:
    """Whether this run fine-tunes anything (and so needs the recipes `select` chooses)."""
    return args.mode in ("select", "bar", "all") or bool(any(args.epochs) or args.kmeans_epochs)


def grid(state: State, args: argparse.Namespace, chosen: dict[str, Any] | None) -> None:
    baseline(state, args)
    recipe, recipe_k = ((PRUNE_RECIPES[chosen["prune"]], KMEANS_RECIPES[chosen["kmeans"]])
                        if chosen else ((), ()))
    for epochs in args.epochs:
        for density in args.densities:
            for criterion in args.criteria:
                pruned = prune_point(state, args, criterion, density, epochs, recipe)
                for k in args.ks:
                    kmeans_point(state, args, pruned, k, 0, recipe_k)
                    if epochs:  # centroids are fine-tuned on fine-tuned pruned models only
                        kmeans_point(state, args, pruned, k, args.kmeans_epochs, recipe_k)


def coding_points(state: State, args: argparse.Namespace) -> None:
    """The post-training magnitude points of the grid (prune, then k-means at every K), files
    only: what the sparse coder table reads. `grid` adds their test top-1 later."""
    for density in args.densities:
        pruned = prune_point(state, args, "magnitude", density, 0, (), evaluate_test=False)
        for k in args.ks:
            kmeans_point(state, args, pruned, k, 0, (), evaluate_test=False)


def bar_settings(args: argparse.Namespace, chosen: dict[str, Any]) -> list[str]:
    return [f"criterion={args.bar_criterion}", f"density={args.bar_density}",
            f"k={args.bar_k}", f"holdout={args.holdout}", f"ecs_warmup_epochs={args.ecs_warmup}",
            f"scope={chosen['scope']}", f"distill={str(chosen['distill']).lower()}",
            f"prune:finetune_epochs={args.bar_prune_epochs}",
            f"kmeans:finetune_epochs={args.bar_kmeans_epochs}",
            *(f"prune:{s}" for s in PRUNE_RECIPES[chosen["prune"]]),
            *(f"kmeans:{s}" for s in KMEANS_RECIPES[chosen["kmeans"]]), *args.bar_set]


def bar(state: State, args: argparse.Namespace, chosen: dict[str, Any]) -> None:
    baseline(state, args)
    key = f"{args.model}/bar/{args.bar_criterion}/{args.bar_density}/{args.bar_k}"
    out = args.workdir / (key.replace("/", "-") + ".fb")
    once(state, key, lambda: pack_point(checkpoint_path(args.model), out, "prune+kmeans+int8",
                                        bar_settings(args, chosen), args))


# --- report -----------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _prune_rows(state: State, model: str) -> list[dict[str, Any]]:
    return [dict(r, key=k) for k, r in state.data.items()
            if k.startswith(f"{model}/prune/") and "/select" not in k]


def prune_tables(state: State, model: str) -> str:
    base = state.get(f"{model}/baseline")
    if base is None:
        return f"No {model} points measured.\n"
    ref = base["top1"]
    lines = [f"Baseline `{MODELS[model][0]}`: **{ref:.2f}%** top-1 (measured here, same "
             f"loader), {state_bytes(model):,} fp32 bytes.", ""]
    rows, chain_rows = [], []
    for r in sorted((r for r in _prune_rows(state, model) if r.get("top1") is not None),
                    key=lambda r: (-float(r["key"].split("/")[3]),
                                                               CRITERIA.index(r["key"].split("/")[2]))):
        _, _, criterion, density, epochs = r["key"].split("/")
        rows.append([criterion, density, r["density"], epochs, f"{r['file_bytes']:,}",
                     f"{r['ratio']:.2f}", r["bits_per_weight"], _pct(r.get("holdout_top1")),
                     _pct(r["top1"]), f"{r['top1'] - ref:+.2f}"])
        stem = Path(r["file"]).stem
        for k in KS:
            for key in sorted(x for x in state.data if x.startswith(f"{stem}/kmeans/{k}/")
                              and "/select" not in x):
                c = state.data[key]
                if c.get("top1") is None:
                    continue
                ft = int(key.split("/")[3])
                chain_rows.append([criterion, density, epochs, k,
                                   f"{ft} x {_setting(c, 'train_limit')}"
                                   if ft else "0", f"{c['file_bytes']:,}", f"{c['ratio']:.2f}",
                                   c["bits_per_weight"], _pct(c.get("holdout_top1")),
                                   _pct(c["top1"]), f"{c['top1'] - ref:+.2f}"])
    lines += ["### Pruning alone (weights stored raw fp32, coder `auto`)", "",
              md_table(["criterion", "density asked", "density kept", "fine-tune epochs",
                        "file bytes", "ratio", "bits/weight", "held-out top-1", "test top-1",
                        "vs baseline"], rows), "",
              "### Pruning, then k-means (`prune+kmeans`)", "",
              "Centroid fine-tuning: epochs x training images per epoch (gradient sharing, "
              "zero cluster fixed, indices frozen); 0 = post-training k-means.", "",
              md_table(["criterion", "density", "prune fine-tune epochs", "K",
                        "centroid fine-tuning", "file bytes",
                        "ratio", "bits/weight", "held-out top-1", "test top-1",
                        "vs baseline"], chain_rows), ""]
    return "\n".join(lines)


def _setting(row: dict[str, Any], key: str) -> str:
    return next(s.split("=", 1)[1] for s in row["settings"] if s.startswith(f"{key}="))


def state_bytes(model: str) -> int:
    sd = torch.load(checkpoint_path(model), map_location="cpu", weights_only=True)
    return sum(4 * t.numel() for t in sd.values() if t.is_floating_point())


def select_table(state: State, model: str, chosen: dict[str, Any]) -> str:
    prune_winners = {chosen["prune"]}
    if chosen["distill"]:
        prune_winners.add(f"{chosen['prune']}-distill")
    if chosen["scope"] == "layerwise":
        prune_winners.add(f"{chosen['prune']}-layerwise")
    rows = []
    for key, r in sorted(state.data.items()):
        if "/select-" in key and key.startswith(model):
            point, choice = key.split("/select-")
            fit_report = r["finetune"][0] or r["finetune"][1] or {}
            what = ("k-means K=16 on the chosen pruned model, 1 epoch x "
                    f"{_setting(r, 'train_limit')} images" if "/kmeans/" in point
                    else "prune: magnitude, density 0.2, 1 epoch x "
                    f"{int(_setting(r, 'train_limit')) or 'all'} images")
            winner = (choice == chosen["kmeans"] if "/kmeans/" in point
                      else choice in prune_winners)
            rows.append([what, choice,
                         _pct(r.get("holdout_top1")), fit_report.get("seconds", "-"),
                         "**chosen**" if winner else ""])
    if not rows:
        return ""
    return md_table(["point", "candidate",
                     "held-out top-1 (best epoch)", "train s", ""], rows) + "\n"


def bar_table(state: State, model: str) -> str:
    base = state.get(f"{model}/baseline")
    rows = []
    for key, r in sorted(state.data.items()):
        if key.startswith(f"{model}/bar/") and base:
            ok = r["ratio"] >= 16 and base["top1"] - r["top1"] <= 1.5
            rows.append([key.replace(f"{model}/bar/", ""), " ".join(r["settings"]),
                         f"{r['file_bytes']:,}", f"{r['ratio']:.2f}", r["bits_per_weight"],
                         _pct(r.get("holdout_top1")), _pct(r["top1"]),
                         f"{r['top1'] - base['top1']:+.2f}", "**met**" if ok else "missed"])
    if not rows:
        return "Not measured yet.\n"
    return md_table(["point", "settings", "file bytes", "ratio", "bits/weight",
                     "held-out top-1", "test top-1", "vs baseline",
                     "bar (ratio >= 16, within 1.5)"], rows) + "\n"


def bars(state: State, model: str) -> list[Bar]:
    """The issue's bar, judged on each chained point measured (ratio >= 16, within 1.5)."""
    base = state.get(f"{model}/baseline")
    out = []
    for key, r in sorted(state.data.items()):
        if key.startswith(f"{model}/bar/") and base and r.get("top1") is not None:
            drop = base["top1"] - r["top1"]
            out.append(Bar(f"{model} prune+kmeans+int8 ({key.split('/bar/')[1]}): ratio >= 16 "
                           f"within 1.5 pts of baseline top-1", r["ratio"] >= 16 and drop <= 1.5,
                           f"ratio {r['ratio']:.2f}, top-1 {r['top1']:.2f} vs {base['top1']:.2f} "
                           f"({-drop:+.2f} pts) on all 10,000 test images"))
    return out


def coding_rows(state: State, model: str) -> list[list[Any]]:
    """Every index stream (and raw-value stream) of the grid's files, re-coded by each coder."""
    rows = []
    for key, r in sorted(state.data.items()):
        if not key.startswith(f"{model}-prune") or "/select" in key or "/kmeans/" not in key \
                or not key.endswith("/0"):
            continue
        path = Path(r["file"])
        if not path.exists():
            continue
        rows.append(_file_coding(key, path))
    for r in _prune_rows(state, model):
        path = Path(r["file"])
        if path.exists():
            rows.append(_file_coding(r["key"], path, role="values"))
    return rows


def _file_coding(key: str, path: Path, role: str = "indices") -> list[Any]:
    bound = ans = runs = best_without = best = 0.0
    chosen = 0
    streams = 0
    with open_packed(path) as packed:
        for tensor in packed.model.tensors:
            is_weight = tensor.name.endswith("weight") and len(tensor.shape) in (2, 4)
            if (tensor.scheme == "raw") != (role == "values") or not is_weight:
                continue
            for r, stream in tensor.streams():
                if r != role:
                    continue
                symbols = read_stream(packed, stream, tensor.name)
                kept, sizes = coders.encode_best(symbols, stream.alphabet_size)
                without, _ = coders.encode_best(symbols, stream.alphabet_size,
                                                [c for c in coders.CODERS if c != "runs"])
                bound += stream.entropy_bits * stream.count / 8
                ans += sizes["ans"]
                runs += sizes.get("runs", sizes["ans"])
                best_without += without.nbytes
                best += kept.nbytes
                chosen += int(kept.coder == "runs")
                streams += 1
    label = key.split("/")
    if role == "values":
        what = f"{label[2]} d={label[3]} ft {label[4]} raw fp32 bytes"
    else:
        _, _, criterion, density, epochs = label[0].split("-")
        what = f"{criterion} d={density} ft {epochs} K={label[2]}"
    return [what, streams, f"{bound:,.0f}", f"{ans:,.0f}", f"{runs:,.0f}",
            f"{100 * (1 - runs / ans):+.2f}%", f"{best_without:,.0f}", f"{best:,.0f}",
            f"{100 * (1 - best / best_without):+.2f}%", chosen]


def context_table(state: State, model: str) -> str:
    """Why the gain is small: order-0, Markov-1 and run-length entropies of the masks."""
    rows = []
    for r in sorted(_prune_rows(state, model), key=lambda r: r["key"]):
        sd = load(Path(r["file"])).state_dict()
        o0 = m1 = rl = 0.0
        for name, w in sd.items():
            if not (name.endswith("weight") and w.dim() in (2, 4)):
                continue
            mask = (w.reshape(-1) != 0).numpy().astype(np.int64)
            o0 += _entropy(np.bincount(mask, minlength=2))
            prev = np.concatenate([[0], mask[:-1]])
            pairs = np.bincount(prev * 2 + mask, minlength=4)
            m1 += _entropy(pairs[:2]) + _entropy(pairs[2:])
            ones = np.flatnonzero(mask)
            runs = np.diff(np.concatenate([[-1], ones, [mask.size]])) - 1
            rl += _entropy(np.bincount(runs))
        _, _, criterion, density, epochs = r["key"].split("/")
        rows.append([criterion, density, epochs, f"{o0 / 8:,.0f}", f"{m1 / 8:,.0f}",
                     f"{rl / 8:,.0f}", f"{100 * (1 - rl / o0):+.1f}%"])
    return md_table(["criterion", "density", "prune fine-tune epochs", "order-0 bytes",
                     "Markov-1 bytes",
                     "run-length bytes", "run-length vs order-0"], rows) + "\n"


def _entropy(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def results_name(base: str, model: str) -> str:
    """One results file per model: the ResNet-20 one keeps the plain name the docs link."""
    return base if model == "resnet20" else f"{base}-{model}"


def report(state: State, args: argparse.Namespace, chosen: dict[str, Any] | None,
           command: str) -> None:
    model = args.model
    recipes = (f"Chosen on the held-out images (below): prune fine-tuning "
               f"`{' '.join(PRUNE_RECIPES[chosen['prune']])}`, centroid fine-tuning "
               f"`{' '.join(KMEANS_RECIPES[chosen['kmeans']])}`, for the bar also scope "
               f"`{chosen['scope']}` and distillation `{chosen['distill']}`; cosine schedule "
               f"to 0, " if chosen else
               "No point here is fine-tuned, so no recipe was chosen; ")
    body = [
        f"Model `{MODELS[model][0]}` on `data/cifar10` (train/ for fine-tuning, "
        f"{args.holdout:,} of its images held out to choose every setting and epoch; test/ "
        f"evaluated once per point). {recipes}"
        f"batch {args.batch_size}, mask held at every step; ECS warm-up {args.ecs_warmup} "
        f"epoch(s) of SGD. Files written with `--alignment "
        f"{args.alignment}`. Ratio = fp32 bytes of the checkpoint / file bytes on disk; "
        f"bits/weight over the Conv/Linear weights (their codebooks included).", "",
        "## The bar: a chained point with ratio >= 16 within 1.5 points of baseline", "",
        bar_table(state, model), "",
        "## Choices (held-out split only)", "",
        (select_table(state, model, chosen) if chosen else "") or "Not measured.\n", "",
        "## Grid", "", prune_tables(state, model)]
    write_results(results_name("prune", model), f"Pruning and trained weight sharing: {model}",
                  command, "\n".join(body), bars(state, model))
    report_coding(state, args, command)


def report_coding(state: State, args: argparse.Namespace, command: str) -> None:
    model = args.model
    coding = coding_rows(state, model)
    body = [
        "Every index stream of the post-training `prune+kmeans` files of the grid (`ft N`: the "
        "pruned model was fine-tuned N epochs first; and the raw fp32 byte streams of the "
        "pruned-only files), re-coded here: the order-0 entropy bound "
        "(`sum n H / 8`), `ans` (order-0 rANS), `runs` (docs/CODERS.md), and what `auto` stores "
        f"with and without `runs` among its choices (auto keeps raw/zstd unless a slower coder "
        f"is over {coders.SLOW_MARGIN_PERCENT}% smaller). Bytes include each coder's tables.", "",
        md_table(["file", "streams", "order-0 bound", "ans", "runs", "runs vs ans",
                  "auto without runs", "auto", "auto gain", "streams choosing runs"],
                 coding) if coding else "Not measured yet.", "",
        "## How much structure the masks have", "",
        "Entropy of each pruned file's zero/non-zero mask under three models (no tables): "
        "order-0 (independent positions), Markov-1 (previous position as context), and the "
        "empirical law of the run lengths of zeros. The smaller the gap, the closer the mask "
        "is to independent, and no coder can gain much on it.", "",
        context_table(state, model)]
    write_results(results_name("sparse_coding", model),
                  f"Sparse index coding on pruned {model} tensors", command, "\n".join(body))


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("select", "grid", "bar", "report", "all", "coding"))
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prune-bench"))
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--ks", nargs="+", type=int, default=list(KS))
    p.add_argument("--epochs", type=int, nargs="+", default=[1],
                   help="grid: prune fine-tuning epochs (each value a set of grid rows)")
    p.add_argument("--kmeans-epochs", type=int, default=1, help="grid: centroid epochs")
    p.add_argument("--kmeans-train-limit", type=int, default=10000,
                   help="training images per centroid fine-tuning epoch")
    p.add_argument("--ecs-warmup", type=int, default=1)
    p.add_argument("--bar-criterion", default="magnitude", choices=CRITERIA)
    p.add_argument("--bar-density", type=float, default=0.25)
    p.add_argument("--bar-k", type=int, default=16)
    p.add_argument("--bar-prune-epochs", type=int, default=8)
    p.add_argument("--bar-kmeans-epochs", type=int, default=2)
    p.add_argument("--bar-set", action="append", default=None,
                   help="extra KEY=VALUE for the bar (default: fp16=true, raw tensors at fp16)")
    p.add_argument("--holdout", type=int, default=5000,
                   help="train images held out to choose settings and epochs")
    p.add_argument("--prune-train-limit", type=int, default=0,
                   help="training images per prune fine-tuning epoch (0: all)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test images (default all 10,000; fewer only for smoke runs)")
    p.add_argument("--alignment", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-dirty", action="store_true")
    args = p.parse_args(argv)
    args.bar_set = ["fp16=true"] if args.bar_set is None else args.bar_set
    refuse_dirty_tree(args.allow_dirty)
    setup_torch(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    state = State(args.workdir)
    command = "python tools/bench/prune.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    if args.mode == "coding":
        coding_points(state, args)
        report_coding(state, args, command)
        return 0
    # measured once; later modes read it back from the state
    selected = any(k.startswith(f"{args.model}/") and "/select-" in k for k in state.data)
    chosen = select(state, args) if trains(args) or selected else None
    print(json.dumps({"chosen": chosen}), flush=True)
    if args.mode in ("grid", "all"):
        grid(state, args, chosen)
    if args.mode in ("bar", "all"):
        bar(state, args, chosen)
    if args.mode in ("report", "all"):
        # What regenerates the file whole: `all` where anything trains (it chooses recipes
        # and packs the bar); an untrained grid is its grid then its report.
        report(state, args, chosen,
               command.replace(f" {args.mode}", " all", 1) if chosen else
               f"{command.replace(f' {args.mode}', ' grid', 1)} && "
               f"{command.replace(f' {args.mode}', ' report', 1)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
