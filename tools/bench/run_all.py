"""Run the whole weightpack benchmark and write docs/RESULTS.md.

    python tools/bench/run_all.py                 # full run -> docs/RESULTS.md
    python tools/bench/run_all.py --quick         # smoke check: resnet20, 2,000 images, stdout
    python tools/bench/run_all.py --out FILE.md   # write elsewhere

Sections: (1) method table (size, bits per weight, top-1, pack/load time, bars), (2) coder
table on the real streams of packed resnet20 files, (3) load time of packed resnet56 vs the
plain torch path. Progress goes to stderr, the Markdown report to stdout and ``--out``.
Temporary packed files live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import accuracy
import coders
import load_time
from _common import REPO_ROOT, machine_lines, setup_torch, shared_dir, verdict

DEFAULT_OUT = REPO_ROOT / "docs" / "RESULTS.md"
QUICK_IMAGES = 2000


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _notes(acc: accuracy.MethodResults, cod: coders.CoderResults,
           load: load_time.LoadResults) -> list[str]:
    """Observations derived from the measured numbers (nothing hard-coded)."""
    notes = []
    r20 = [r for r in acc.rows if r.model == "resnet20"]
    lossless = [r for r in r20 if r.method == "none" and r.label == "none (fp32)"]
    if lossless:
        r = lossless[0]
        notes.append(f"`none` (fp32) is lossless: top-1 delta {r.delta:+.2f} pts; entropy "
                     f"coding alone (byte-shuffled zstd) makes the file {r.ratio:.2f}x smaller "
                     "than fp32.")
    for f in cod.files:
        best = min(coders.CODERS, key=lambda c: f.stats[c].total_bytes)
        fastest = max(coders.CODERS, key=lambda c: f.stats[c].decode_mps)
        auto = f.stats["auto"]
        notes.append(
            f"Coders on {f.label}: smallest single coder is `{best}` "
            f"({f.stats[best].total_bytes / f.bound_bytes:.3f}x the order-0 bound), `auto` "
            f"{auto.total_bytes / f.bound_bytes:.3f}x; fastest decode `{fastest}` "
            f"({f.stats[fastest].decode_mps:.0f} Msym/s per stream), `huffman` "
            f"{f.stats['huffman'].decode_mps:.1f}, `ans` {f.stats['ans'].decode_mps:.1f}, "
            f"`auto` {auto.decode_mps:.1f} Msym/s (it picks by size only: "
            + ", ".join(f"{k} x{v}" for k, v in f.auto_choice.items()) + ").")
        ans = f.stats["ans"]
        tables = ans.total_bytes - ans.payload_bytes
        if tables > 0.02 * ans.total_bytes:
            notes.append(f"On {f.label} the ans payload is {ans.payload_bytes / f.bound_bytes:.3f}"
                         f"x the bound but its frequency tables add {tables:,} bytes "
                         f"({tables / ans.total_bytes:.1%} of its total), which is why it loses "
                         "there.")
        if f.stats["zstd"].total_bytes < f.bound_bytes:
            notes.append(f"On {f.label}, zstd beats the order-0 bound "
                         f"({f.stats['zstd'].total_bytes / f.bound_bytes:.3f}x): the streams have "
                         "structure an order-0 model cannot see (e.g. byte planes of floats).")
    mse = {r.label: r for r in r20 if r.method == "uniform"}
    for bits in (4, 5):
        a, b = mse.get(f"uniform {bits}b clip=mse"), mse.get(f"uniform {bits}b clip=max")
        if a and b:
            notes.append(f"uniform {bits}b: clip=mse gives ratio {a.ratio:.2f} / delta "
                         f"{a.delta:+.2f} pts, clip=max ratio {b.ratio:.2f} / delta "
                         f"{b.delta:+.2f} pts.")
    slow = [c for c in load_time.PACKED if load.ratio(c.label) > load_time.BAR_RATIO]
    for cfg in slow:
        parts = list(load.components.values())
        notes.append(f"Load bar fails for {load.model} {cfg.label} (ratio "
                     f"{load.ratio(cfg.label):.2f}); breakdown medians: "
                     + ", ".join(f"{p.label.strip()} {p.median * 1e3:.0f} ms" for p in parts)
                     + f"; forcing coder=ans gives ratio "
                     f"{load.ratio(load_time.DIAGNOSTIC.label):.2f}.")
    notes.append("Timings (pack s, load s, decode speeds) come from a shared, noisy 2-core "
                 "machine; only ratios measured side by side in one run are comparable.")
    return notes


def build_report(args: argparse.Namespace, command: str, workdir: Path) -> tuple[str, bool]:
    """Run the three sections; returns the Markdown report and whether every bar passed."""
    started = time.perf_counter()
    models = ["resnet20"] if args.quick else ["resnet20", "resnet56"]
    limit = QUICK_IMAGES if args.quick else None
    _log("== method table ==")
    acc = accuracy.run(models, limit, workdir, log=_log)
    _log("== coder table ==")
    cod = coders.run(workdir, repeats=3 if args.quick else 5, log=_log)
    _log("== load time ==")
    load_model = "resnet20" if args.quick else "resnet56"
    load = load_time.run(workdir, load_model, repeats=7 if args.quick else 9, log=_log)
    elapsed = time.perf_counter() - started

    bars = [(b.name, b.ok) for b in acc.bars]
    bars += [(f"coders {f.label}: ans payload <= {coders.ANS_SLACK} x bound (streams > 4 KB)",
              f.ans_ok) for f in cod.files]
    bars += [(f"coders {f.label}: auto <= best single coder", f.auto_ok) for f in cod.files]
    bars += [(f"load {load.model} {c.label}: ratio {load.ratio(c.label):.2f} <= "
              f"{load_time.BAR_RATIO}", load.ratio(c.label) <= load_time.BAR_RATIO)
             for c in load_time.PACKED]
    images = acc.baselines[0].images
    lines = [
        "# weightpack benchmark results",
        "",
        *machine_lines(),
        f"- command: `{command}`" + (" (quick smoke run: resnet20 only, "
                                     f"{QUICK_IMAGES:,} images)" if args.quick else ""),
        f"- data: `$WEIGHTPACK_SHARED/data/cifar10/test` ({shared_dir().name}/), {images:,} "
        "images decoded once "
        f"({acc.decode_s:.1f} s); total benchmark time {elapsed / 60:.1f} min",
        "",
        "Generated by `tools/bench/run_all.py`; every number below was measured in this run "
        "except rows marked as quoted.",
        "",
        "## Summary of bars",
        "",
        *(f"- **{verdict(ok)}** {name}" for name, ok in bars),
        "",
        "## 1. Methods",
        "",
        acc.markdown,
        "",
        "## 2. Entropy coders (real streams of packed resnet20 files)",
        "",
        cod.markdown,
        "",
        f"## 3. Load time ({load.model})",
        "",
        load.markdown,
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in _notes(acc, cod, load)),
        "",
    ]
    return "\n".join(lines), all(ok for _, ok in bars)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"resnet20 only, {QUICK_IMAGES:,} images (smoke check)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown output (default: {DEFAULT_OUT.relative_to(REPO_ROOT)} "
                             "for a full run, none for --quick)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    command = shlex.join(["python", "tools/bench/run_all.py",
                          *(sys.argv[1:] if argv is None else argv)])
    setup_torch()
    with tempfile.TemporaryDirectory(prefix="wp-bench-") as tmp:
        report, ok = build_report(args, command, Path(tmp))
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        _log(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
