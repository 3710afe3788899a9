"""Coder table: every entropy coder on the real symbol streams of packed resnet20 files.

The streams are read back from the files (index streams of the quantized files, byte-shuffled
raw-value streams of the `none` file), re-coded with each coder and with ``encode_best``
("auto"), compared with the order-0 entropy bound, and decoded to time each coder.
Writes docs/results/coders.md: ``python tools/bench/coders.py [--allow-dirty] [--no-write]``.
``--synthetic`` instead measures every coder's size and encode/decode speed on three seeded
synthetic streams and writes docs/results/coders-synthetic.md (the tables docs/CODERS.md points
at).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from _common import (
    BAR_FAILED,
    Bar,
    PackConfig,
    add_results_args,
    command_line,
    ensure_packed,
    md_table,
    median_time,
    refuse_dirty_tree,
    verdict,
    write_results,
)

from runtime import coders
from runtime.coders import CODERS, CodedStream
from runtime.decode import read_stream
from runtime.format.reader import open_packed

MODEL = "resnet20"
FILES: tuple[tuple[PackConfig, str], ...] = (
    (PackConfig("kmeans K=32", "kmeans", ("k=32",)), "indices"),
    (PackConfig("int8", "int8"), "indices"),
    (PackConfig("uniform 5b clip=mse", "uniform", ("bits=5", "clip=mse")), "indices"),
    (PackConfig("none (fp32)", "none"), "values"),
)
"""Packed files of the coder table, with the stream role taken from each."""

ALL_CODERS = (*CODERS, "auto")
ANS_SLACK = 1.01
ANS_MIN_BYTES = 4096
"""The ans bar applies to streams whose bit-packed (raw) size exceeds this many bytes."""


@dataclass
class Stream:
    """One symbol stream read back from a packed file."""

    name: str
    symbols: np.ndarray
    alphabet: int
    stored_bytes: int  # payload + parameter tables as stored in the file
    stored_coder: str
    coded: dict[str, CodedStream] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.symbols.size)

    @property
    def bound_bytes(self) -> float:
        """Order-0 entropy bound of this stream in bytes."""
        return coders.entropy_bits(self.symbols, self.alphabet) * self.count / 8


def read_streams(path: Path, role: str) -> list[Stream]:
    """Every stream of ``role`` in the packed file, decoded with the coder the file used."""
    out = []
    with open_packed(path) as packed:
        for tensor in packed.model.tensors:
            for r, rec in tensor.streams():
                if r != role:
                    continue
                symbols = read_stream(packed, rec, f"{tensor.name}/{r}")
                out.append(Stream(f"{tensor.name}/{r}", symbols, rec.alphabet_size,
                                  rec.blob.length + rec.params_nbytes(), rec.coder))
    return out


@dataclass
class CoderStats:
    """Size and decode speed of one coder over all streams of one file."""

    coder: str
    total_bytes: int = 0
    payload_bytes: int = 0
    decode_mps: float = 0.0  # per-stream decoding, M symbols/s
    concat_bytes: int | None = None
    concat_mps: float | None = None  # one stream of all symbols, M symbols/s


@dataclass
class FileResult:
    """The coder comparison of one packed file, with its checks."""

    label: str
    role: str
    streams: int
    symbols: int
    alphabet: str
    bound_bytes: float
    stored_bytes: int
    stats: dict[str, CoderStats]
    auto_choice: dict[str, int]
    ans_checked: int
    ans_worst: tuple[str, float] | None
    ans_failures: list[str]
    auto_failures: list[str]
    mismatches: list[str]

    @property
    def ans_ok(self) -> bool:
        return not self.ans_failures

    @property
    def auto_ok(self) -> bool:
        return not self.auto_failures


def _encode_all(stream: Stream) -> None:
    for name in CODERS:
        stream.coded[name] = coders.encode(stream.symbols, stream.alphabet, name)
    best, tried = coders.encode_best(stream.symbols, stream.alphabet)
    for name, size in tried.items():  # plus variants auto also tries (byte-wide zstd)
        if name in stream.coded and size != stream.coded[name].nbytes:
            raise RuntimeError(f"{stream.name}: encode_best reports {size} B for {name}, "
                               f"encode gives {stream.coded[name].nbytes} B")
    stream.coded["auto"] = best


def _decoder(pairs: Sequence[tuple[CodedStream, int, int]]) -> Callable[[], None]:
    def run() -> None:
        for coded, count, alphabet in pairs:
            coders.decode(coded, count, alphabet)
    return run


def _median_interleaved(jobs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per job over ``repeats`` rounds; the order rotates every round."""
    names = list(jobs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(repeats):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def measure_file(label: str, path: Path, role: str, repeats: int) -> FileResult:
    """Re-code and time every stream of ``role`` in ``path``."""
    streams = read_streams(path, role)
    for s in streams:
        _encode_all(s)
        for name, coded in s.coded.items():
            if not np.array_equal(coders.decode(coded, s.count, s.alphabet), s.symbols):
                raise RuntimeError(f"{label} {s.name}: {name} does not round-trip")
    n = sum(s.count for s in streams)
    stats = {c: CoderStats(c, sum(s.coded[c].nbytes for s in streams),
                           sum(len(s.coded[c].payload) for s in streams)) for c in ALL_CODERS}

    ans_failures, auto_failures, mismatches = [], [], []
    ans_checked, ans_worst = 0, None
    for s in streams:
        if len(s.coded["raw"].payload) > ANS_MIN_BYTES:
            ans_checked += 1
            rel = len(s.coded["ans"].payload) / s.bound_bytes
            if ans_worst is None or rel > ans_worst[1]:
                ans_worst = (s.name, rel)
            if rel > ANS_SLACK:
                ans_failures.append(f"{s.name}: {rel:.4f}")
        best_single = min(s.coded[c].nbytes for c in CODERS)
        # The rule auto follows (runtime.coders.pick): a fast coder within the margin of the
        # smallest stream is kept for its decode speed; never more than that.
        if s.coded["auto"].nbytes * 100 > best_single * (100 + coders.SLOW_MARGIN_PERCENT):
            auto_failures.append(f"{s.name}: auto {s.coded['auto'].nbytes} > "
                                 f"{best_single} + {coders.SLOW_MARGIN_PERCENT}%")
        if s.stored_bytes != s.coded["auto"].nbytes:
            mismatches.append(f"{s.name}: file stores {s.stored_bytes} B ({s.stored_coder}), "
                              f"encode_best gives {s.coded['auto'].nbytes} B")

    jobs = {c: _decoder([(s.coded[c], s.count, s.alphabet) for s in streams])
            for c in ALL_CODERS}
    alphabets = sorted({s.alphabet for s in streams})
    if len(alphabets) == 1:
        k = alphabets[0]
        concat = np.concatenate([s.symbols for s in streams])
        whole = {c: coders.encode(concat, k, c) for c in CODERS}
        whole["auto"] = coders.encode_best(concat, k)[0]
        for c in ALL_CODERS:
            stats[c].concat_bytes = whole[c].nbytes
            jobs[f"concat:{c}"] = _decoder([(whole[c], n, k)])
    seconds = _median_interleaved(jobs, repeats)
    for c in ALL_CODERS:
        stats[c].decode_mps = n / seconds[c] / 1e6
        if f"concat:{c}" in seconds:
            stats[c].concat_mps = n / seconds[f"concat:{c}"] / 1e6

    choice = Counter(s.coded["auto"].coder for s in streams)
    return FileResult(label, role, len(streams), n, ",".join(map(str, alphabets)),
                      sum(s.bound_bytes for s in streams), sum(s.stored_bytes for s in streams),
                      stats, {c: choice[c] for c in CODERS if choice[c]}, ans_checked,
                      ans_worst, ans_failures, auto_failures, mismatches)


def render(results: Sequence[FileResult], repeats: int) -> str:
    """Markdown for the coder table and its checks."""
    headers = ["file (streams)", "coder", "total bytes", "payload bytes", "total / bound",
               "decode Msym/s per stream", "concatenated: bytes", "decode Msym/s concatenated"]
    rows: list[list[object]] = []
    for r in results:
        best_single = min(r.stats[c].total_bytes for c in CODERS)
        rows.append([f"**{MODEL} {r.label}** ({r.streams} {r.role} streams, {r.symbols:,} "
                     f"symbols, K={r.alphabet})", "*order-0 entropy bound*",
                     f"{r.bound_bytes:,.0f}", "", "1.000", "", "", ""])
        for c in ALL_CODERS:
            s = r.stats[c]
            name = f"**{c}**" if c != "auto" and s.total_bytes == best_single else c
            if c == "auto":
                name += " (picks " + ", ".join(f"{k} {v}" for k, v in r.auto_choice.items()) + ")"
            rows.append(["", name, f"{s.total_bytes:,}", f"{s.payload_bytes:,}",
                         f"{s.total_bytes / r.bound_bytes:.3f}", f"{s.decode_mps:.1f}",
                         "—" if s.concat_bytes is None else f"{s.concat_bytes:,}",
                         "—" if s.concat_mps is None else f"{s.concat_mps:.1f}"])
    parts = [
        md_table(headers, rows, "llrrrrrr"),
        "",
        "Bytes are payload + coder parameter tables (what the file stores per stream; the "
        "entropy bound counts neither tables nor chunk offsets). A **bold** coder is the best "
        "single coder for the file. Decode speed = symbols / median time of "
        f"{repeats} interleaved rounds, decoding each stream separately (what `runtime.load` "
        "does) or one concatenated stream of the same symbols (per-call overhead amortised). "
        f"Streams over {ANS_MIN_BYTES // 1024} KB = bit-packed (`raw`) payload above "
        f"{ANS_MIN_BYTES:,} bytes.",
    ]
    for r in results:
        if r.mismatches:
            parts += ["", f"{r.label}: the file's stored streams differ from a per-stream "
                      "`encode_best` where `packer compress`'s per-file plan (`Encoder.plan`, "
                      "docs/CODERS.md) gave a stream a slower, smaller coder: "
                      + "; ".join(r.mismatches[:5])]
    parts += ["", "Notes (derived from the numbers above):", "",
              *(f"- {n}" for n in notes(results))]
    return "\n".join(parts)


def notes(results: Sequence[FileResult]) -> list[str]:
    """Observations derived from the measured numbers (nothing hard-coded)."""
    out = []
    for f in results:
        best = min(CODERS, key=lambda c: f.stats[c].total_bytes)
        fastest = max(CODERS, key=lambda c: f.stats[c].decode_mps)
        auto = f.stats["auto"]
        out.append(
            f"{f.label}: smallest single coder is `{best}` "
            f"({f.stats[best].total_bytes / f.bound_bytes:.3f}x the order-0 bound), `auto` "
            f"{auto.total_bytes / f.bound_bytes:.3f}x; fastest decode `{fastest}` "
            f"({f.stats[fastest].decode_mps:.0f} Msym/s per stream), `huffman` "
            f"{f.stats['huffman'].decode_mps:.1f}, `ans` {f.stats['ans'].decode_mps:.1f}, "
            f"`auto` {auto.decode_mps:.1f} Msym/s (it picks by size only: "
            + ", ".join(f"{k} x{v}" for k, v in f.auto_choice.items()) + ").")
        ans = f.stats["ans"]
        tables = ans.total_bytes - ans.payload_bytes
        if tables > 0.02 * ans.total_bytes:
            out.append(f"{f.label}: the ans payload is {ans.payload_bytes / f.bound_bytes:.3f}x "
                       f"the bound but its frequency tables add {tables:,} bytes "
                       f"({tables / ans.total_bytes:.1%} of its total), which is why it loses "
                       "there.")
        if f.stats["zstd"].total_bytes < f.bound_bytes:
            out.append(f"{f.label}: zstd beats the order-0 bound "
                       f"({f.stats['zstd'].total_bytes / f.bound_bytes:.3f}x): the streams have "
                       "structure an order-0 model cannot see (e.g. byte planes of floats).")
    out.append("Decode speeds come from a shared, noisy 2-core machine; compare them only "
               "within this run.")
    return out


@dataclass
class CoderResults:
    """Everything the coder section measured."""

    files: list[FileResult]
    markdown: str

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.bars())

    def bars(self) -> list[Bar]:
        out = []
        for f in self.files:
            worst = ("no stream over the size" if f.ans_worst is None
                     else f"worst {f.ans_worst[0]} at {f.ans_worst[1]:.4f} x bound")
            out.append(Bar(f"coders {f.label}: ans payload <= {ANS_SLACK} x entropy bound, "
                           f"every stream over {ANS_MIN_BYTES // 1024} KB", f.ans_ok,
                           f"{f.ans_checked} streams checked, {worst}"
                           + (f"; over: {', '.join(f.ans_failures)}" if f.ans_failures else "")))
        for f in self.files:
            best_single = min(f.stats[c].total_bytes for c in CODERS)
            out.append(Bar(f"coders {f.label}: auto at most {coders.SLOW_MARGIN_PERCENT}% over "
                           "the smallest coder on every stream (runtime.coders' rule: a fast "
                           "coder within that margin is kept)",
                           f.auto_ok, f"{len(f.auto_failures)} stream violations of {f.streams}; "
                           f"file total auto {f.stats['auto'].total_bytes:,} vs best single "
                           f"{best_single:,}"))
        return out


def run(workdir: Path, repeats: int = 5, log=print) -> CoderResults:
    """Measure the coder table on the packed resnet20 files in ``workdir`` (packing if needed)."""
    results = []
    for cfg, role in FILES:
        path = ensure_packed(workdir, MODEL, cfg)
        res = measure_file(cfg.label, path, role, repeats)
        results.append(res)
        sizes = ", ".join(f"{c} {s.total_bytes:,}" for c, s in res.stats.items())
        log(f"coders {cfg.label}: bound {res.bound_bytes:,.0f} B; {sizes}")
        worst = "-" if res.ans_worst is None else f"{res.ans_worst[0]} {res.ans_worst[1]:.4f}"
        log(f"  ans bar {verdict(res.ans_ok)} ({res.ans_checked} streams > 4 KB, worst "
            f"{worst}); auto bar {verdict(res.auto_ok)}; auto picks {res.auto_choice}")
        for m in res.mismatches:
            log(f"  WARNING stored vs encode_best: {m}")
    return CoderResults(results, render(results, repeats))


def synthetic_streams(n: int) -> dict[str, tuple[np.ndarray, int]]:
    """Seeded synthetic streams: dense 4-bit, 70%-zero 4-bit, dense bytes."""
    rng = np.random.default_rng(0)
    zero70 = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 16, n))
    return {
        "16-level dense": (rng.integers(0, 16, n), 16),
        "16-level 70%-zero": (zero70, 16),
        "256-level dense": (rng.integers(0, 256, n), 256),
    }


def synthetic(count: int, repeats: int) -> str:
    """Markdown: size against the entropy bound and encode/decode speed of every coder on
    `count` synthetic symbols; times are the median of `repeats` runs."""
    parts = [f"{count:,} symbols per stream; times: median of {repeats} runs, single thread."]
    for name, (symbols, k) in synthetic_streams(count).items():
        h = coders.entropy_bits(symbols, k)
        bound = h * count / 8
        rows: list[list[object]] = []
        for coder in CODERS:
            stream = coders.encode(symbols, k, coder)
            if not np.array_equal(coders.decode(stream, count, k), symbols):
                raise RuntimeError(f"{coder} does not round-trip {name}")
            t_enc = median_time(partial(coders.encode, symbols, k, coder), repeats)
            t_dec = median_time(partial(coders.decode, stream, count, k), repeats)
            rows.append([coder, f"{len(stream.payload):,}", f"{stream.params_nbytes():,}",
                         f"{stream.nbytes / bound:.4f}", f"{count / t_enc / 1e6:.1f}",
                         f"{count / t_dec / 1e6:.1f}"])
        parts += ["", f"{name} (K={k}): entropy {h:.4f} bits/symbol = {bound:,.0f} bytes", "",
                  md_table(["coder", "payload B", "params B", "total / entropy",
                            "encode Msym/s", "decode Msym/s"], rows, "lrrrrr")]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (median)")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic streams instead of the packed resnet20 files")
    parser.add_argument("--count", type=int, default=4_000_000,
                        help="symbols per synthetic stream (default 4,000,000)")
    add_results_args(parser)
    args = parser.parse_args(argv)
    if not args.no_write:
        refuse_dirty_tree(args.allow_dirty)
    if args.synthetic:
        body = synthetic(args.count, args.repeats)
        if not args.no_write:
            path = write_results("coders-synthetic", "Entropy coders on synthetic streams",
                                 command_line(__file__, argv), body)
            print(f"wrote {path}", file=sys.stderr)
        print(body)
        return 0
    with tempfile.TemporaryDirectory(prefix="wp-bench-") as tmp:
        result = run(Path(tmp), args.repeats, log=lambda s: print(s, file=sys.stderr))
    if not args.no_write:
        path = write_results("coders", "Entropy coders on the real streams of packed ResNet-20 "
                             "files", command_line(__file__, argv), result.markdown,
                             result.bars())
        print(f"wrote {path}", file=sys.stderr)
    print(result.markdown)
    return 0 if result.ok else BAR_FAILED


if __name__ == "__main__":
    sys.exit(main())
