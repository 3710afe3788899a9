"""Method table: size, bits per weight, top-1, pack and load time of every packing config.

The CIFAR-10 test folder is decoded once into an in-memory tensor (the model's input-spec
transform) and every model, the uncompressed baseline included, is evaluated on that same
tensor in large batches. The uniform bar's point is chosen among declared candidates by
top-1 on training images held out for validation (`_eval.validation_set`), never on the
test images. Writes docs/results/accuracy.md:
``python tools/bench/accuracy.py [--quick] [--allow-dirty] [--no-write]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    BAR_FAILED,
    Bar,
    PackConfig,
    add_results_args,
    arch_of,
    checkpoint_path,
    command_line,
    md_table,
    median_time,
    pack_file,
    packed_path,
    refuse_dirty_tree,
    setup_torch,
    shared_dir,
    verdict,
    write_results,
)
from _eval import ImageSet, load_fp32, margin_note, standard_error, test_set, top1, validation_set

import runtime
from packer.compress import compressible_weights
from runtime import zoo

LOAD_REPEATS = 3

RESNET20_CONFIGS: tuple[PackConfig, ...] = (
    PackConfig("none (fp32)", "none"),
    PackConfig("none fp16", "none", ("fp16=true",)),
    PackConfig("int8", "int8"),
    *(PackConfig(f"uniform {b}b clip=mse", "uniform", (f"bits={b}", "clip=mse"))
      for b in (3, 4, 5, 6)),
    *(PackConfig(f"uniform {b}b clip=max", "uniform", (f"bits={b}", "clip=max")) for b in (4, 5)),
    *(PackConfig(f"kmeans K={k}", "kmeans", (f"k={k}",)) for k in (16, 32, 64)),
)
"""clip is always given explicitly so a change of the packer's default cannot relabel a row;
every other option takes the packer's default and is printed from the file's config. The
uniform bar's point is added to the table after it is chosen (see UNIFORM_CANDIDATES)."""
_FIRST_LAST_8B = ("conv1.bits=8", "linear.bits=8")
UNIFORM_CANDIDATES: tuple[PackConfig, ...] = (
    *(PackConfig(f"uniform {b}b clip={c}", "uniform", (f"bits={b}", f"clip={c}"))
      for b in (3, 4) for c in ("mse", "max")),
    *(PackConfig(f"uniform 4b clip={c}, 8b first/last", "uniform",
                 ("bits=4", f"clip={c}", *_FIRST_LAST_8B)) for c in ("mse", "max")),
    *(PackConfig(f"uniform 4b clip={c}, 5b layer1, 8b first/last", "uniform",
                 ("bits=4", f"clip={c}", "layer1.*.bits=5", *_FIRST_LAST_8B))
      for c in ("mse", "max")),
)
"""Declared candidates for the bar 'a uniform point within 0.8 pt at ratio >= 8' on resnet20.
Those at ratio >= 8 (a size, known without data) are scored on held-out training images;
the best one is the bar's point and the only candidate whose test top-1 the bar reads."""
UNIFORM_RATIO = 8.0
UNIFORM_LOSS = 0.8
VALIDATION_HOLDOUT = 5000
"""Training images held out (seed 0, `packer.training.build_datasets`) to choose on."""
RESNET56_CONFIGS: tuple[PackConfig, ...] = (
    PackConfig("none (fp32)", "none"),
    PackConfig("int8", "int8"),
    PackConfig("uniform 5b clip=mse", "uniform", ("bits=5", "clip=mse")),
    PackConfig("kmeans K=32", "kmeans", ("k=32",)),
)
CONFIGS = {"resnet20": RESNET20_CONFIGS, "resnet56": RESNET56_CONFIGS}


@dataclass
class MethodRow:
    """Measured numbers of one packed file."""

    model: str
    label: str
    method: str
    file_bytes: int
    fp32_bytes: int
    bits_per_weight: float
    report_bits_per_weight: float
    top1: float
    delta: float
    pack_s: float
    load_s: float
    options: str = ""

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes


@dataclass
class Baseline:
    """The uncompressed checkpoint evaluated by the same code on the same tensor."""

    model: str
    top1: float
    images: int
    eval_s: float


def measure_baseline(model: str, test: ImageSet) -> Baseline:
    """Top-1 of the uncompressed checkpoint on ``test``."""
    start = time.perf_counter()
    acc = top1(load_fp32(model), test)
    return Baseline(model, acc, len(test), time.perf_counter() - start)


def weight_names(model: str) -> set[str]:
    """Names of the Conv/Linear weights, the tensors the methods compress."""
    return set(compressible_weights(zoo.build(arch_of(model))))


def measure_config(model: str, cfg: PackConfig, test: ImageSet, baseline: Baseline,
                   workdir: Path) -> MethodRow:
    """Pack ``model`` with ``cfg``, then time runtime.load and evaluate the loaded module."""
    output = packed_path(workdir, model, cfg)
    report = pack_file(checkpoint_path(model), output, cfg)  # fresh: pack_s is measured here
    file_bytes = output.stat().st_size
    names = weight_names(model)
    rows = [r for r in report["tensors"] if r["name"] in names]
    bits = 8 * sum(r["coded_bytes"] for r in rows) / sum(r["numel"] for r in rows)
    load_s = median_time(lambda: runtime.load(output), LOAD_REPEATS)
    acc = top1(runtime.load(output), test)
    return MethodRow(model, cfg.label, cfg.method, file_bytes, int(report["fp32_bytes"]), bits,
                     float(report["bits_per_weight"]), acc, acc - baseline.top1,
                     float(report["pack_seconds"]), load_s, resolved_options(report))


def resolved_options(report: dict[str, Any]) -> str:
    """The method options the packer actually used (from the file), defaults included."""
    config = report.get("config", {})
    opts = {k: v for k, v in sorted(config.get("options", {}).items())
            if v is not None and not (k == "fp16" and v is False)}
    text = " ".join(f"{k}={v}" for k, v in opts.items())
    if config.get("layers"):
        text += f" (+{len(config['layers'])} per-layer settings)"
    return text or "—"


# --- quoted reference numbers ------------------------------------------------------------------


@dataclass(frozen=True)
class QuotedRow:
    """A row of the NNCodec table in BASELINES.md, quoted verbatim (not measured here)."""

    qp: str
    file_bytes: int
    ratio: str
    top1: float


def _table_rows(lines: Sequence[str], start: int) -> list[list[str]]:
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):
            rows.append(cells)
    return rows[1:]  # drop the header


def quoted_baselines() -> tuple[dict[str, float], list[QuotedRow]]:
    """BASELINES.md: quoted top-1 per checkpoint file, and the NNCodec rows."""
    text = (shared_dir() / "models" / "cifar10" / "BASELINES.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| checkpoint"))
    tops: dict[str, float] = {}
    for cells in _table_rows(lines, first):
        match = re.match(r"(\S+)", cells[0])
        if match:
            tops[match.group(1)] = float(cells[1])
    nn_start = next(i for i, line in enumerate(lines) if "NNCodec" in line and line.startswith("|"))
    quoted = [QuotedRow(c[0], int(c[1].replace(",", "")), c[2], float(c[3]))
              for c in _table_rows(lines, nn_start)]
    return tops, quoted


# --- the uniform bar point, chosen on validation ------------------------------------------------


@dataclass
class Candidate:
    """One uniform candidate: its size, and its top-1 on the validation images if eligible."""

    cfg: PackConfig
    file_bytes: int
    ratio: float
    val_top1: float | None


@dataclass
class Selection:
    """The uniform candidates, the validation images they were scored on, and the choice."""

    candidates: list[Candidate]
    val_images: int
    val_source: str
    val_baseline: float
    chosen: PackConfig | None


def choose_uniform(model: str, val: ImageSet, workdir: Path, log=print) -> Selection:
    """Pack every candidate; score those at ratio >= 8 on ``val``; pick the best score."""
    baseline = top1(load_fp32(model), val)
    log(f"{model} uncompressed on {val.source}: {baseline:.2f}")
    out: list[Candidate] = []
    for cfg in UNIFORM_CANDIDATES:
        path = workdir / f"candidate-{cfg.slug}.fb"
        report = pack_file(checkpoint_path(model), path, cfg)
        ratio = float(report["fp32_bytes"]) / path.stat().st_size
        score = top1(runtime.load(path), val) if ratio >= UNIFORM_RATIO else None
        out.append(Candidate(cfg, path.stat().st_size, ratio, score))
        log(f"  candidate {cfg.label:<40} ratio {ratio:5.2f}  validation top-1 "
            + ("-" if score is None else f"{score:.2f}"))
    scored = [c for c in out if c.val_top1 is not None]
    best = max(scored, key=lambda c: (c.val_top1, c.ratio), default=None)
    return Selection(out, len(val), val.source, baseline, best.cfg if best else None)


def render_selection(sel: Selection) -> str:
    rows = [[c.cfg.label + (" **(chosen)**" if c.cfg == sel.chosen else ""),
             f"`{' '.join(c.cfg.overrides)}`", f"{c.file_bytes:,}", f"{c.ratio:.2f}",
             "—" if c.val_top1 is None else f"{c.val_top1:.2f}"] for c in sel.candidates]
    return "\n".join([
        md_table(["candidate", "options", "file bytes", "ratio",
                  f"validation top-1 % (ratio >= {UNIFORM_RATIO:g} only)"], rows, "llrrr"),
        "",
        f"Validation: {sel.val_source}; the uncompressed model scores {sel.val_baseline:.2f}% "
        "on them (they were in its training set, so top-1 reads high: they rank candidates, "
        "they do not estimate test accuracy). Standard error of one top-1 on "
        f"{sel.val_images:,} images: about "
        f"{standard_error(sel.val_baseline, sel.val_images):.2f} points.",
    ])


# --- bars and rendering ------------------------------------------------------------------------


def check_bars(rows: Sequence[MethodRow], baselines: Sequence[Baseline], sel: Selection | None,
               model: str = "resnet20") -> list[Bar]:
    """The issue's bars, judged on ``model``'s measured rows (the uniform one on its chosen
    point only)."""
    by_label = {r.label: r for r in rows if r.model == model}
    images = next(b.images for b in baselines if b.model == model)
    out: list[Bar] = []

    def single(name: str, label: str | None, max_loss: float, min_ratio: float) -> None:
        r = by_label.get(label) if label else None
        if r is None:
            out.append(Bar(name, False, "not measured"))
            return
        ok = r.delta >= -max_loss and r.ratio >= min_ratio
        note = margin_note(r.delta + max_loss, r.top1, images)
        out.append(Bar(name, ok, f"{label}: delta {r.delta:+.2f} pts, ratio {r.ratio:.2f}"
                   + note))

    single(f"{model} kmeans K=32 within 1.5 pts at ratio >= 7", "kmeans K=32", 1.5, 7.0)
    single(f"{model} int8 within 0.2 pt at ratio >= 3.8", "int8", 0.2, 3.8)
    single(f"{model} a uniform point within {UNIFORM_LOSS} pt at ratio >= {UNIFORM_RATIO:g} "
           "(point chosen on validation)", sel.chosen.label if sel and sel.chosen else None,
           UNIFORM_LOSS, UNIFORM_RATIO)
    return out


def render(rows: Sequence[MethodRow], baselines: Sequence[Baseline],
           quoted_tops: dict[str, float], quoted: Sequence[QuotedRow]) -> str:
    """Markdown for the method table and the baselines."""
    headers = ["model", "method / config", "options used (from the file)", "file bytes",
               "ratio vs fp32", "bits / weight", "top-1 %", "delta pts", "pack s", "load s"]
    table: list[list[object]] = []
    for b in baselines:
        table.append([b.model, "**baseline**: fp32 checkpoint (torch.load)", "—",
                      f"{checkpoint_path(b.model).stat().st_size:,}", "—", "32", f"{b.top1:.2f}",
                      "0.00", "—", "—"])
        for r in (r for r in rows if r.model == b.model):
            options = f"`{r.options}`" if r.options != "—" else "—"
            table.append([r.model, r.label, options, f"{r.file_bytes:,}", f"{r.ratio:.2f}",
                          f"{r.bits_per_weight:.3f}", f"{r.top1:.2f}", f"{r.delta:+.2f}",
                          f"{r.pack_s:.2f}", f"{r.load_s:.3f}"])
    ref = quoted_tops.get(checkpoint_path("resnet20").name)
    for q in quoted:
        delta = "—" if ref is None else f"{q.top1 - ref:+.2f} †"
        table.append(["resnet20", f"*NNCodec QP {q.qp} (quoted from BASELINES.md, not "
                      "measured here)*", "—", f"{q.file_bytes:,}", q.ratio, "—", f"{q.top1:.2f}",
                      delta, "—", "—"])
    quotes = []
    for b in baselines:
        name = checkpoint_path(b.model).name
        if name in quoted_tops:
            quotes.append(f"{name} {quoted_tops[name]:.2f}")
    n = baselines[0].images
    parts = [
        md_table(headers, table, "lll" + "r" * 7),
        "",
        f"Baselines measured here on {n:,} test images: "
        + ", ".join(f"{b.model} {b.top1:.2f} %" for b in baselines)
        + (f" (BASELINES.md quotes {', '.join(quotes)} on all 10,000)." if quotes else ".")
        + (f" † Delta of a quoted NNCodec row = its quoted top-1 minus the quoted baseline "
           f"{ref:.2f}." if ref is not None and quoted else ""),
        f"Standard error of one top-1 near {baselines[0].top1:.0f}% on {n:,} images: "
        f"{standard_error(baselines[0].top1, n):.2f} points.",
        "File bytes are from the file system; ratio = fp32 bytes of every floating-point tensor "
        "/ file bytes; bits / weight = 8 x coded bytes (streams + codebooks/scales) of the "
        "Conv/Linear weights / their count (for `none` those weights are stored raw). Load s = "
        f"median of {LOAD_REPEATS} `runtime.load` calls; pack s = the packer's own "
        "`pack_seconds` (includes its round-trip check).",
    ]
    mismatched = [r for r in rows if r.method not in ("none",)
                  and abs(r.bits_per_weight - r.report_bits_per_weight) > 1e-6]
    if mismatched:
        parts += ["", "WARNING: bits / weight differs from the packer report's "
                  "`bits_per_weight` for: " + ", ".join(f"{r.model} {r.label}" for r in mismatched)]
    return "\n".join(parts)


@dataclass
class MethodResults:
    """Everything the method section measured."""

    rows: list[MethodRow]
    baselines: list[Baseline]
    selection: Selection
    bars: list[Bar]
    markdown: str
    decode_s: float


def run(models: Sequence[str], limit: int | None, workdir: Path, val_limit: int | None = None,
        log=print) -> MethodResults:
    """Choose the uniform bar point on validation, then measure every config of ``models``
    on one decoded test tensor."""
    specs = {arch_of(m): zoo.input_spec(arch_of(m)) for m in models}
    first = arch_of(models[0])
    if any(s != specs[first] for s in specs.values()):
        raise RuntimeError("the models need different input specs; this bench decodes once")
    val = validation_set(VALIDATION_HOLDOUT, seed=0, limit=val_limit)
    selection = choose_uniform("resnet20", val, workdir, log)
    log(f"uniform bar point chosen on validation: "
        f"{selection.chosen.label if selection.chosen else 'none reaches ratio 8'}")
    del val
    test = test_set(first, limit)
    log(f"decoded {len(test):,} test images in {test.decode_s:.1f} s "
        f"-> tensor {tuple(test.images.shape)}, {test.images.numel() * 4 / 1e6:.0f} MB")
    rows: list[MethodRow] = []
    baselines: list[Baseline] = []
    for model in models:
        base = measure_baseline(model, test)
        baselines.append(base)
        log(f"{model} baseline top-1 {base.top1:.2f} % ({base.eval_s:.1f} s)")
        configs = list(CONFIGS[model])
        if model == "resnet20" and selection.chosen and selection.chosen not in configs:
            configs.append(selection.chosen)
        for cfg in configs:
            row = measure_config(model, cfg, test, base, workdir)
            rows.append(row)
            log(f"  {model} {cfg.label:<24} {row.file_bytes:>9,} B  ratio {row.ratio:5.2f}  "
                f"{row.bits_per_weight:6.3f} b/w  top-1 {row.top1:.2f} ({row.delta:+.2f})  "
                f"pack {row.pack_s:.2f} s  load {row.load_s:.3f} s")
    bars = check_bars(rows, baselines, selection, "resnet20")
    for bar in bars:
        log(f"BAR {verdict(bar.ok)}: {bar.name} -- {bar.measured}")
    tops, quoted = quoted_baselines()
    markdown = "\n".join([
        "## Methods", "", render(rows, baselines, tops, quoted), "",
        "## The uniform bar's point, chosen on validation", "",
        "Every declared candidate is packed; those at ratio >= "
        f"{UNIFORM_RATIO:g} are scored on held-out training images, and the best score is the "
        "bar's point (its test top-1 is its row in the table above). No test image is read "
        "before the choice is made.", "",
        render_selection(selection),
    ])
    return MethodResults(rows, baselines, selection, bars, markdown, test.decode_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="resnet20 only, 2,000 test and 1,000 validation images; "
                             "prints, writes nothing")
    add_results_args(parser)
    args = parser.parse_args(argv)
    write = not (args.quick or args.no_write)
    if write:
        refuse_dirty_tree(args.allow_dirty)
    setup_torch()
    models = ["resnet20"] if args.quick else ["resnet20", "resnet56"]
    with tempfile.TemporaryDirectory(prefix="wp-bench-") as tmp:
        result = run(models, 2000 if args.quick else None, Path(tmp),
                     1000 if args.quick else None, log=lambda s: print(s, file=sys.stderr))
    if write:
        path = write_results("accuracy", "Methods: size and top-1 on CIFAR-10",
                             command_line(__file__, argv), result.markdown, result.bars)
        print(f"wrote {path}", file=sys.stderr)
    print(result.markdown)
    return 0 if all(b.ok for b in result.bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
