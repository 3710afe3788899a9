"""Load speed: `runtime.load` against torch.load + build + load_state_dict, decode speed per
coder, and what the coder rule costs in bytes (issue 12).

Models: the shared CIFAR ResNet-20 and ResNet-56 checkpoints, and torchvision's ResNet-50 with
seeded random weights saved as a state_dict (no download; 25.6 M weights). Each is packed
`none`, `kmeans` (K=32) and `uniform` 4-bit with the default coder choice (`auto`).

1. Load: every packed file's `runtime.load` and the plain torch path (`torch.load(...,
   weights_only=True)` + `runtime.zoo.build` + `load_state_dict`), interleaved (the order
   rotates each round) after one untimed call each, at 1 and at 2 torch threads; min and
   median. Bar: median and min of `runtime.load` <= 1.0x the torch path for ResNet-56 and
   ResNet-50, kmeans and uniform.
2. Where the load goes, step by step, for the ResNet-56 and ResNet-50 kmeans files at 1 thread:
   each step of `runtime.load` (index parse, skeleton, checks, decode, assigning the tensors)
   and of the torch path (torch.load, build, load_state_dict), interleaved rounds.
3. Decode speed: ResNet-50 kmeans and uniform 4-bit rewritten with every stream in one coder,
   `open_packed` + `decode_state_dict` in M weights/s (bar: >= 100 for the `auto` files).
4. Bytes: the index/value streams of each file as `auto` chose them (a slow coder only where it
   saves more than `SLOW_MARGIN_PERCENT`) against `auto` at a 1% margin (the rule of main before
   this change, commit 9aceee3) and the smallest coder per stream (margin 0, the `auto` before
   issue 12). Bar: at most 1% more bytes than the 1% rule on the judged files.

    python tools/bench/load_speed.py [--rounds 9]   # writes docs/results/load_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from _common import (
    BAR_FAILED,
    Bar,
    PackConfig,
    add_results_args,
    command_line,
    md_table,
    pack_file,
    refuse_dirty_tree,
    shared_dir,
    verdict,
    write_results,
)

import runtime
from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime import coders, zoo
from runtime.coders import CODERS
from runtime.decode import decode_state_dict, decode_tensor, read_stream
from runtime.format.reader import open_packed
from runtime.loader import assign_state, build_skeleton, check_fits, check_input_fits

BAR_RATIO = 1.0
BAR_MWPS = 100.0
BAR_BYTES_PERCENT = 1.0
BEFORE_MARGIN = 1  # SLOW_MARGIN_PERCENT of main at 9aceee3: the bytes bar's reference
MODELS = {  # name -> (checkpoint or None for a seeded torchvision model, architecture)
    "resnet20": ("resnet20-cifar10jpg.pth", "cifar_resnet20"),
    "resnet56": ("resnet56-cifar10jpg.pth", "cifar_resnet56"),
    "resnet50": (None, "torchvision.resnet50"),
}
JUDGED_MODELS = ("resnet56", "resnet50")
PACKS = (
    PackConfig("none", "none"),
    PackConfig("kmeans K=32", "kmeans", ("k=32",)),
    PackConfig("uniform 4-bit", "uniform", ("bits=4",)),
)
JUDGED_PACKS = ("kmeans K=32", "uniform 4-bit")
TORCH = "torch.load + build + load_state_dict"


def checkpoint(workdir: Path, model: str) -> Path:
    name, arch = MODELS[model]
    if name is not None:
        return shared_dir() / "models" / "cifar10" / name
    path = workdir / f"{model}-seed0.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(zoo.build(arch).state_dict(), path)
    return path


def torch_path(path: Path, arch: str) -> Callable[[], object]:
    def run() -> object:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module = zoo.build(arch)
        module.load_state_dict(state, strict=True)
        return module.eval()
    return run


def interleaved(jobs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    for fn in jobs.values():
        fn()
    names = list(jobs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jobs[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def stream_coders(path: Path) -> str:
    counts: dict[str, int] = {}
    with open_packed(path) as packed:
        for t in packed.model.tensors:
            for _, stream in t.streams():
                counts[stream.coder] = counts.get(stream.coder, 0) + 1
    return ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def stream_bytes(path: Path) -> tuple[int, int, int]:
    """Bytes of the streams (payload and coder tables) as stored, as `auto` at the 1% margin
    would store them, and with the smallest coder for every stream."""
    stored = before = smallest = 0
    with open_packed(path) as packed:
        for t in packed.model.tensors:
            for role, stream in t.streams():
                symbols = read_stream(packed, stream, f"{t.name}/{role}")
                coded = coders.CodedStream(**stream.coder_params(), payload=b"")
                stored += stream.blob.length + coded.params_nbytes()
                old, sizes = coders.encode_best(symbols, stream.alphabet_size,
                                                slow_margin_percent=BEFORE_MARGIN)
                before += old.nbytes
                smallest += min(sizes.values())
    return stored, before, smallest


def load_steps(path: Path) -> dict[str, float]:
    """One `runtime.load` of a zoo file, step by step (what `runtime.load` does, in order)."""
    times: dict[str, float] = {}
    start = time.perf_counter()

    def step(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        times[f"runtime.load: {name}"] = now - start
        start = now
    with open_packed(path) as packed:
        step("open_packed: preamble, index parse, layout")
        module = build_skeleton(packed.model)
        step("build_skeleton (meta device)")
        check_fits(module, packed)
        check_input_fits(module, packed)
        step("check_fits, check_input_fits")
        state = decode_state_dict(packed)
        step("decode_state_dict")
    assign_state(module, state)
    step("assign_state (load_state_dict's work)")
    module.eval()
    step("eval()")
    times["runtime.load: sum of the steps"] = sum(times.values())
    return times


def torch_steps(source: Path, arch: str) -> dict[str, float]:
    """The torch path, step by step."""
    start = time.perf_counter()
    state = torch.load(source, map_location="cpu", weights_only=True)
    loaded = time.perf_counter()
    module = zoo.build(arch)
    built = time.perf_counter()
    module.load_state_dict(state, strict=True)
    module.eval()
    done = time.perf_counter()
    return {"torch: torch.load(weights_only=True)": loaded - start,
            "torch: zoo.build (initialised)": built - loaded,
            "torch: load_state_dict (copy) + eval()": done - built,
            "torch: sum of the steps": done - start}


def rewrite(source: Path, out: Path, coder: str) -> Path:
    """`source` with every stream re-coded by `coder` (same tensors, same index)."""
    with open_packed(source) as packed:
        model = packed.model
        tensors = {t.name: decode_tensor(packed, t) for t in model.tensors}
    data = DataSection(packed.preamble.alignment)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in tensors.items())
    write_packed(out, replace(model, tensors=records), data)
    return out


def decode_rate(path: Path, rounds: int) -> tuple[float, float]:
    """(best, median) M weights/s of open_packed + decode_state_dict."""
    with open_packed(path) as packed:
        numel = sum(t.numel for t in packed.model.tensors)

    def run() -> object:
        with open_packed(path) as packed:
            return decode_state_dict(packed)
    times = interleaved({"d": run}, rounds)["d"]
    return numel / min(times) / 1e6, numel / statistics.median(times) / 1e6


def fmt_ms(times: list[float]) -> tuple[str, str]:
    return f"{min(times) * 1e3:.1f}", f"{statistics.median(times) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workdir", type=Path,
                        help="keep the packed files here and reuse them (default: a temporary "
                        "folder)")
    add_results_args(parser)
    args = parser.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out: list[str] = []
    bars: list[Bar] = []
    with tempfile.TemporaryDirectory(prefix="wp-load-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files: dict[tuple[str, str], Path] = {}
        for model in args.models:
            for cfg in PACKS:
                path = work / f"{model}-{cfg.slug}.fb"
                if not path.exists():
                    log(f"packing {model} {cfg.label}")
                    pack_file(checkpoint(work, model), path, cfg)
                files[model, cfg.label] = path

        # 1. load vs torch
        rows = []
        for model in args.models:
            arch = MODELS[model][1]
            src = checkpoint(work, model)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                jobs = {TORCH: torch_path(src, arch)}
                for cfg in PACKS:
                    jobs[cfg.label] = lambda p=files[model, cfg.label]: runtime.load(p)
                log(f"load {model}, {threads} thread(s)")
                samples = interleaved(jobs, args.rounds)
                base = samples[TORCH]
                rows.append([model, threads, TORCH, f"{src.stat().st_size:,}", "",
                             *fmt_ms(base), "1.00 / 1.00", ""])
                for cfg in PACKS:
                    t = samples[cfg.label]
                    r_min = min(t) / min(base)
                    r_med = statistics.median(t) / statistics.median(base)
                    judged = model in JUDGED_MODELS and cfg.label in JUDGED_PACKS
                    good = r_min <= BAR_RATIO and r_med <= BAR_RATIO
                    if judged:
                        bars.append(Bar(
                            f"load {model} {cfg.label}, {threads} thread(s): runtime.load <= "
                            f"{BAR_RATIO}x the torch path (min and median)", good,
                            f"ratio min {r_min:.2f}, median {r_med:.2f} "
                            f"({statistics.median(t) * 1e3:.0f} ms vs "
                            f"{statistics.median(base) * 1e3:.0f} ms)"))
                    path = files[model, cfg.label]
                    rows.append([model, threads, f"runtime.load {cfg.label}",
                                 f"{path.stat().st_size:,}", stream_coders(path), *fmt_ms(t),
                                 f"{r_min:.2f} / {r_med:.2f}",
                                 f"**{verdict(good)}**" if judged else ""])
        out += ["## Load time against the torch path", "",
                md_table(["model", "threads", "path", "file bytes", "streams by coder",
                          "min ms", "median ms", "ratio min / median", f"<= {BAR_RATIO}"],
                         rows, "lrlrlrrrl"), "",
                f"{args.rounds} interleaved rounds after one untimed call of each (files in the "
                "page cache); ratio = min over min and median over median of the torch path "
                "in the same rounds. The torch path builds the model with its initialisation "
                "(as a user's code does); `runtime.load` builds it on the meta device and "
                "checks the file against it before decoding.", ""]

        # 2. where the load goes, step by step
        big = args.models[-1]
        torch.set_num_threads(1)
        for model in [m for m in args.models if m in JUDGED_MODELS]:
            path, src = files[model, "kmeans K=32"], checkpoint(work, model)
            pair = [lambda p=path: load_steps(p),
                    lambda s=src, a=MODELS[model][1]: torch_steps(s, a)]
            steps: dict[str, list[float]] = {}
            for run in pair:  # untimed, as above
                run()
            for r in range(args.rounds):
                for run in pair[r % 2:] + pair[:r % 2]:
                    for name, t in run().items():
                        steps.setdefault(name, []).append(t)
            rows = [[name, *fmt_ms(t)] for name, t in steps.items()]
            out += [f"## Where the {model} kmeans load goes (1 thread)", "",
                    md_table(["step", "min ms", "median ms"], rows), "",
                    f"{args.rounds} interleaved rounds of each path, its steps timed in turn "
                    "(`runtime.load` does the same steps; `assign_state` is the "
                    "`load_state_dict(strict=True, assign=True)` it replaces where that would "
                    "only set the tensors).", ""]

        # 3. decode speed per coder
        rows = []
        for label in JUDGED_PACKS:
            source = files[big, label]
            variants = {"auto": source}
            for coder in CODERS:
                log(f"rewriting {big} {label} with {coder}")
                variants[coder] = rewrite(source, work / f"{big}-{coder}.fb", coder)
            for coder, p in variants.items():
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    best, med = decode_rate(p, max(3, args.rounds // 2))
                    judged = coder == "auto"
                    good = med >= BAR_MWPS
                    if judged and threads == 2 and big == "resnet50":
                        bars.append(Bar(f"decode {big} {label} (auto), 2 threads: >= "
                                        f"{BAR_MWPS:.0f} M weights/s (median)", good,
                                        f"{med:.0f} M weights/s (best {best:.0f})"))
                    shown = judged and threads == 2 and big == "resnet50"
                    rows.append([label, coder, threads, f"{p.stat().st_size:,}",
                                 f"{best:.0f}", f"{med:.0f}",
                                 f"**{verdict(good)}**" if shown else ""])
        out += [f"## Decode speed per coder ({big}, open_packed + decode_state_dict)", "",
                md_table(["file", "coder", "threads", "file bytes", "best M weights/s",
                          "median M weights/s", f">= {BAR_MWPS:.0f}"], rows, "llrrrrl"), "",
                "Weights = elements of every tensor in the file (BatchNorm included).", ""]

        # 4. bytes of the coder rule
        rows = []
        for (model, label), p in files.items():
            stored, before, smallest = stream_bytes(p)
            growth = 100 * (stored - before) / p.stat().st_size
            judged = model in JUDGED_MODELS and label in JUDGED_PACKS
            good = growth <= BAR_BYTES_PERCENT
            if judged:
                bars.append(Bar(f"bytes {model} {label}: auto at most {BAR_BYTES_PERCENT}% of "
                                f"the file over auto at the {BEFORE_MARGIN}% margin", good,
                                f"{growth:+.2f}% ({stored - before:+,} bytes)"))
            rows.append([model, label, f"{p.stat().st_size:,}", f"{stored:,}", f"{before:,}",
                         f"{smallest:,}", f"{growth:+.2f}%",
                         f"{100 * (stored / smallest - 1):+.2f}%",
                         f"**{verdict(good)}**" if judged else ""])
        out += ["## Bytes of the coder rule", "",
                md_table(["model", "pack", "file bytes", "stream bytes (auto)",
                          f"auto at {BEFORE_MARGIN}% margin", "smallest per stream",
                          "auto over the 1% rule (of the file)", "auto over smallest",
                          f"<= +{BAR_BYTES_PERCENT}%"], rows, "llrrrrrrl"), "",
                "Stream bytes are payloads plus coder tables. `auto` keeps raw/zstd (zstd also "
                "over one byte per symbol) unless huffman/ans/runs is more than "
                f"{coders.SLOW_MARGIN_PERCENT}% smaller on that stream, so it is never more "
                f"than {coders.SLOW_MARGIN_PERCENT}% over the smallest-per-stream choice; the "
                f"{BEFORE_MARGIN}% rule is main's before this change (commit 9aceee3).", ""]

    out.append("A figure measured while other jobs ran (see the load average above) is "
               "noisier; the rounds are interleaved so that it hits every path alike.")
    body = "\n".join(out)
    print(body)
    if not args.no_write:
        path = write_results("load_speed", "Load speed: runtime.load vs torch.load",
                             command_line(__file__, argv), body, bars)
        log(f"wrote {path}")
    return 0 if all(b.ok for b in bars) else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
