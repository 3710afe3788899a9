"""Method table: size, bits per weight, top-1, pack and load time of every packing config.

The CIFAR-10 test folder is decoded once into an in-memory tensor (the model's input-spec
transform) and every model, the uncompressed baseline included, is evaluated on that same
tensor in large batches. Run alone: ``python tools/bench/accuracy.py [--quick]``.
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

import torch
from _common import (
    PackConfig,
    arch_of,
    checkpoint_path,
    md_table,
    median_time,
    pack_file,
    packed_path,
    setup_torch,
    shared_dir,
    verdict,
)
from torch import Tensor, nn

import runtime
from packer.compress import compressible_weights
from runtime import zoo
from runtime.data import cifar10_dataset, make_loader
from runtime.evaluate import evaluate

EVAL_BATCH = 256
"""Images per forward pass. On this 2-core machine 256 in channels_last ran 1.5-2.5x faster
than 1000 in the default layout (the activations of a batch then stay nearer the cache)."""
LOAD_REPEATS = 3

RESNET20_CONFIGS: tuple[PackConfig, ...] = (
    PackConfig("none (fp32)", "none"),
    PackConfig("none fp16", "none", ("fp16=true",)),
    PackConfig("int8", "int8"),
    *(PackConfig(f"uniform {b}b clip=mse", "uniform", (f"bits={b}", "clip=mse"))
      for b in (3, 4, 5, 6)),
    *(PackConfig(f"uniform {b}b clip=max", "uniform", (f"bits={b}", "clip=max")) for b in (4, 5)),
    PackConfig("uniform 4b, 5b layer1, 8b first/last", "uniform",
               ("bits=4", "clip=max", "layer1.*.bits=5", "conv1.bits=8", "linear.bits=8")),
    *(PackConfig(f"kmeans K={k}", "kmeans", (f"k={k}",)) for k in (16, 32, 64)),
)
"""clip is always given explicitly so a change of the packer's default cannot relabel a row;
every other option takes the packer's default and is printed from the file's config."""
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


@dataclass
class TestSet:
    """Decoded test images (normalised) and labels, in memory."""

    images: Tensor
    targets: Tensor
    decode_s: float

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.images.split(EVAL_BATCH), self.targets.split(EVAL_BATCH),
                        strict=True))


def load_test_set(arch: str, limit: int | None = None, workers: int = 2) -> TestSet:
    """Decode the CIFAR-10 test folder once with ``arch``'s input spec (strict: no skips)."""
    start = time.perf_counter()
    dataset = cifar10_dataset(shared_dir() / "data" / "cifar10", "test",
                              zoo.input_spec(arch), strict=True)
    loader = make_loader(dataset, batch_size=500, workers=workers, limit=limit)
    images, targets = [], []
    for batch_images, batch_targets, skipped in loader:
        if skipped:
            raise RuntimeError(f"{skipped} test images could not be decoded")
        images.append(batch_images)
        targets.append(batch_targets)
    stacked = torch.cat(images).contiguous(memory_format=torch.channels_last)
    return TestSet(stacked, torch.cat(targets), time.perf_counter() - start)


def top1(model: nn.Module, test: TestSet) -> float:
    """Top-1 accuracy in percent of ``model`` on the in-memory test set (inference mode)."""
    model = model.to(memory_format=torch.channels_last)
    return evaluate(model, test.batches(), progress=False).top1


def load_fp32(model: str) -> nn.Module:
    """The plain path: torch.load the fp32 state_dict, build the module, load_state_dict."""
    state = torch.load(checkpoint_path(model), map_location="cpu", weights_only=True)
    module = zoo.build(arch_of(model))
    module.load_state_dict(state, strict=True)
    return module.eval()


def measure_baseline(model: str, test: TestSet) -> Baseline:
    """Top-1 of the uncompressed checkpoint on ``test``."""
    start = time.perf_counter()
    acc = top1(load_fp32(model), test)
    return Baseline(model, acc, len(test.targets), time.perf_counter() - start)


def weight_names(model: str) -> set[str]:
    """Names of the Conv/Linear weights, the tensors the methods compress."""
    return set(compressible_weights(zoo.build(arch_of(model))))


def measure_config(model: str, cfg: PackConfig, test: TestSet, baseline: Baseline,
                   workdir: Path) -> MethodRow:
    """Pack ``model`` with ``cfg``, then time runtime.load and evaluate the loaded module."""
    output = packed_path(workdir, model, cfg)
    report = pack_file(checkpoint_path(model), output, cfg)
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


# --- bars and rendering ------------------------------------------------------------------------


@dataclass(frozen=True)
class BarResult:
    """One acceptance bar with the measured numbers it was judged on."""

    name: str
    measured: str
    ok: bool


def check_bars(rows: Sequence[MethodRow], model: str = "resnet20") -> list[BarResult]:
    """The issue's bars, judged on ``model``'s measured rows."""
    by_label = {r.label: r for r in rows if r.model == model}
    out: list[BarResult] = []

    def single(name: str, label: str, max_loss: float, min_ratio: float) -> None:
        r = by_label.get(label)
        if r is None:
            out.append(BarResult(name, "not measured", False))
            return
        ok = r.delta >= -max_loss and r.ratio >= min_ratio
        out.append(BarResult(name, f"{label}: delta {r.delta:+.2f} pts, ratio {r.ratio:.2f}", ok))

    single(f"{model} kmeans K=32 within 1.5 pts at ratio >= 7", "kmeans K=32", 1.5, 7.0)
    single(f"{model} int8 within 0.2 pt at ratio >= 3.8", "int8", 0.2, 3.8)
    uniform = [r for r in by_label.values() if r.method == "uniform"]
    big = [r for r in uniform if r.ratio >= 8.0]
    name = f"{model} a uniform point within 0.8 pt at ratio >= 8.0"
    if big:
        best = max(big, key=lambda r: r.delta)
        measured = "; ".join(f"{r.label}: delta {r.delta:+.2f} pts, ratio {r.ratio:.2f}"
                             for r in sorted(big, key=lambda r: -r.ratio))
        out.append(BarResult(name, measured, best.delta >= -0.8))
    else:
        top = max(uniform, key=lambda r: r.ratio, default=None)
        measured = ("no uniform config reaches ratio 8.0" if top is None else
                    f"no uniform config reaches ratio 8.0 (highest: {top.label}, "
                    f"ratio {top.ratio:.2f}, delta {top.delta:+.2f} pts)")
        out.append(BarResult(name, measured, False))
    return out


def render(rows: Sequence[MethodRow], baselines: Sequence[Baseline],
           quoted_tops: dict[str, float], quoted: Sequence[QuotedRow],
           bars: Sequence[BarResult]) -> str:
    """Markdown for the method table, the baselines and the bars."""
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
    bar_table = md_table(["bar", "measured", "result"],
                         [[b.name, b.measured, f"**{verdict(b.ok)}**"] for b in bars], "llr")
    quotes = []
    for b in baselines:
        name = checkpoint_path(b.model).name
        if name in quoted_tops:
            quotes.append(f"{name} {quoted_tops[name]:.2f}")
    parts = [
        md_table(headers, table, "lll" + "r" * 7),
        "",
        f"Baselines measured here on {baselines[0].images:,} test images: "
        + ", ".join(f"{b.model} {b.top1:.2f} %" for b in baselines)
        + (f" (BASELINES.md quotes {', '.join(quotes)} on all 10,000)." if quotes else ".")
        + (f" † Delta of a quoted NNCodec row = its quoted top-1 minus the quoted baseline "
           f"{ref:.2f}." if ref is not None and quoted else ""),
        "File bytes are from the file system; ratio = fp32 bytes of every floating-point tensor "
        "/ file bytes; bits / weight = 8 x coded bytes (streams + codebooks/scales) of the "
        "Conv/Linear weights / their count (for `none` those weights are stored raw). Load s = "
        f"median of {LOAD_REPEATS} `runtime.load` calls; pack s = the packer's own "
        "`pack_seconds` (includes its round-trip check).",
        "",
        "Acceptance bars (judged on the measured rows above):",
        "",
        bar_table,
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
    bars: list[BarResult]
    markdown: str
    decode_s: float


def run(models: Sequence[str], limit: int | None, workdir: Path,
        log=print) -> MethodResults:
    """Measure every config of ``models`` on one decoded test tensor."""
    specs = {arch_of(m): zoo.input_spec(arch_of(m)) for m in models}
    first = arch_of(models[0])
    if any(s != specs[first] for s in specs.values()):
        raise RuntimeError("the models need different input specs; this bench decodes once")
    test = load_test_set(first, limit)
    log(f"decoded {len(test.targets):,} test images in {test.decode_s:.1f} s "
        f"-> tensor {tuple(test.images.shape)}, {test.images.numel() * 4 / 1e6:.0f} MB")
    rows: list[MethodRow] = []
    baselines: list[Baseline] = []
    for model in models:
        base = measure_baseline(model, test)
        baselines.append(base)
        log(f"{model} baseline top-1 {base.top1:.2f} % ({base.eval_s:.1f} s)")
        for cfg in CONFIGS[model]:
            row = measure_config(model, cfg, test, base, workdir)
            rows.append(row)
            log(f"  {model} {cfg.label:<24} {row.file_bytes:>9,} B  ratio {row.ratio:5.2f}  "
                f"{row.bits_per_weight:6.3f} b/w  top-1 {row.top1:.2f} ({row.delta:+.2f})  "
                f"pack {row.pack_s:.2f} s  load {row.load_s:.3f} s")
    bars = check_bars(rows, "resnet20")
    for bar in bars:
        log(f"BAR {verdict(bar.ok)}: {bar.name} -- {bar.measured}")
    tops, quoted = quoted_baselines()
    return MethodResults(rows, baselines, bars, render(rows, baselines, tops, quoted, bars),
                         test.decode_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="resnet20 only, 2,000 test images")
    args = parser.parse_args(argv)
    setup_torch()
    models = ["resnet20"] if args.quick else ["resnet20", "resnet56"]
    with tempfile.TemporaryDirectory(prefix="wp-bench-") as tmp:
        result = run(models, 2000 if args.quick else None, Path(tmp),
                     log=lambda s: print(s, file=sys.stderr))
    print(result.markdown)
    return 0 if all(b.ok for b in result.bars) else 1


if __name__ == "__main__":
    sys.exit(main())
