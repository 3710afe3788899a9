"""Standing fuzz campaign for the loader: mutated packed files against everything that reads one.

Each case is a seed file (every scheme x coder, a whole cifar_resnet20 file, an onnx_graph file
exported from a conv net; `tools/fuzz_cases.py`) damaged by one structure-aware mutator. A case
runs in a worker process under a memory limit (RLIMIT_AS) and a time limit, and goes through
what a service or a user does with a file: open and validate, `runtime inspect`'s report
(formatted), `verify`'s checksums, `runtime.load` and one forward pass (for a stored graph,
also the ONNX backend's standalone graph), and, when the architecture refuses the file,
decoding every tensor anyway. The outcome is one of

  loaded         runtime.load returned a model that ran a forward pass
  project_error  a WeightpackError subclass (the file was refused with the project's message)
  crash          the worker died (signal or exit) during the case
  hang           the case ran past the time limit
  other_error    any other exception (a bug)

and the case's peak memory (resident high-water mark of the worker, reset before each case) is
checked against  peak <= baseline + MEMORY_A + MEMORY_B * file_bytes
+ MEMORY_C * declared_bytes,  declared_bytes = decompressed index bytes + the decoded size
(elements x item size) of every tensor the index declares.

    python tools/fuzz.py --cases 300                     # a short campaign, summary on stdout
    python tools/fuzz.py --cases 120000 --write          # the long one -> docs/results/fuzz.md
    python tools/fuzz.py --replay 1234 --campaign 1 --save /tmp/case.fb   # one case's file
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import resource
import select
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTCOMES = ("loaded", "project_error", "crash", "hang", "other_error")
GOOD = ("loaded", "project_error")
MEMORY_A = 96 << 20  # fixed cost of a case: onnxruntime session, torch kernels, Python objects
MEMORY_B = 64  # per byte of file: index records, report, mutated copies of small blobs
MEMORY_C = 8  # per declared byte: symbols, indices, decoded and dequantized copies
DEFAULT_TIME_LIMIT = 20.0
DEFAULT_MEMORY_LIMIT = 4 << 30  # address space a case may add to the worker's
RECYCLE_EVERY = 2000  # cases per worker before a fresh one (state drift, fragmentation)


def memory_bound(file_bytes: int, declared_bytes: int) -> int:
    """Most memory one case may add to the worker's baseline (see the module docstring)."""
    return MEMORY_A + MEMORY_B * file_bytes + MEMORY_C * declared_bytes


@dataclass
class Result:
    number: int
    seed: str
    mutator: str
    outcome: str
    detail: str  # exception class, or the signal / exit status
    step: str = ""  # open, report, verify, load, forward, decode
    message: str = ""
    seconds: float = 0.0
    peak_bytes: int = 0  # high-water mark minus resident size before the case
    file_bytes: int = 0
    declared_bytes: int = 0

    @property
    def bound(self) -> int:
        return memory_bound(self.file_bytes, self.declared_bytes)


# --- the worker: one long-lived process that runs cases sent on stdin --------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    """Make the resident high-water mark (ru_maxrss, VmHWM) the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


SELF_TEST = "WEIGHTPACK_FUZZ_SELF_TEST"
"""When set, files starting with b"PLANT:" make the worker misbehave on purpose, so tests can
check that crashes, hangs, foreign exceptions and memory overruns are all caught."""


def _planted(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PLANT:crash"):
        os.abort()
    if head.startswith(b"PLANT:hang"):
        time.sleep(3600)
    if head.startswith(b"PLANT:other"):
        raise ValueError("planted")
    if head.startswith(b"PLANT:memory"):
        block = bytearray(512 << 20)  # zero-filled: every page is touched
        del block


def run_case(path: str) -> dict:
    """Everything a user or service does with a file; the first exception ends the case."""
    import torch

    import runtime
    from runtime.decode import decode_state_dict
    from runtime.errors import ArchitectureError, WeightpackError
    from runtime.format.dtypes import numpy_dtype
    from runtime.format.reader import open_packed
    from runtime.report import build_report, format_report

    out = {"declared_bytes": 0, "step": "open"}
    try:
        if os.environ.get(SELF_TEST):
            _planted(path)
        with open_packed(path) as packed:
            out["declared_bytes"] = packed.index_raw_size + sum(
                t.numel * numpy_dtype(t.dtype).itemsize for t in packed.model.tensors)
            out["step"] = "report"
            format_report(build_report(packed))
            out["step"] = "verify"
            packed.verify()
            shape = packed.model.input.shape
            graph = packed.model.architecture.kind == "onnx_graph"
        out["step"] = "load"
        try:
            model = runtime.load(path)
        except ArchitectureError:
            out["step"] = "decode"  # the decoders run even when the architecture refuses
            with open_packed(path) as packed:
                decode_state_dict(packed)
            raise
        out["step"] = "forward"
        with torch.inference_mode():
            model(torch.zeros(1, *shape))
        if graph:
            out["step"] = "onnx backend"
            runtime.load(path, backend="onnx")  # the graph with the weights put inline
        out.update(outcome="loaded", detail="")
    except WeightpackError as exc:
        out.update(outcome="project_error", detail=type(exc).__name__, message=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - classifying every other exception is the point
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        out.update(outcome="other_error", detail=type(exc).__name__,
                   message=f"{str(exc)[:300]} at {Path(tb.filename).name}:{tb.lineno}")
    return out


def worker_main(seeds_dir: str, result_fd: int, memory_limit: int) -> None:
    """Warm up on the clean seeds, then run each case named on stdin; one JSON line per case
    on `result_fd`. The parent kills and replaces a worker that dies or runs too long."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import runtime.onnx  # noqa: F401 - imported here, not inside the first case's time
    import runtime.report  # noqa: F401

    for seed in sorted(Path(seeds_dir).glob("*.fb")):  # first-use costs are not the case's
        run_case(str(seed))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    limit = _status("VmSize") + memory_limit
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash is reported, not dumped
    out = os.fdopen(result_fd, "w", buffering=1)
    out.write(json.dumps({"ready": True, "baseline": _status("VmRSS")}) + "\n")
    for line in sys.stdin:
        path = line.strip()
        libc.malloc_trim(0)
        before = _status("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        result = run_case(path)
        result["seconds"] = time.perf_counter() - started
        result["peak_bytes"] = max(0, _status("VmHWM") - before)
        out.write(json.dumps(result) + "\n")


# --- the parent: cases, workers, time limits ---------------------------------------------------


class Worker:
    """A worker process and the case it is running."""

    def __init__(self, seeds_dir: Path, log: Path, memory_limit: int):
        read, write = os.pipe()
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(seeds_dir), str(write),
             str(memory_limit)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log,
            pass_fds=(write,), text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        os.close(write)
        self.results = os.fdopen(read, "r")
        self.deadline = 0.0
        self.done = 0
        self.baseline = 0

    def wait_ready(self, timeout: float) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.results, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise SystemExit("a fuzz worker did not start (see its log)")
        line = self.results.readline()
        if not line:
            raise SystemExit(f"a fuzz worker died while starting (see {self.log.name})")
        self.baseline = json.loads(line)["baseline"]

    def send(self, path: Path, time_limit: float) -> None:
        self.deadline = time.monotonic() + time_limit
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()

    def stop(self) -> int | None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        status = self.proc.wait()
        for stream in (self.proc.stdin, self.results, self.log):
            with contextlib.suppress(OSError):
                stream.close()
        return status


def _death(status: int | None) -> str:
    if status is not None and status < 0:
        return signal.Signals(-status).name
    return f"exit {status}"


Case = tuple[int, str, str, bytes]  # number, seed name, mutator name, file bytes


def run_campaign(cases: int, workers: int = 2, campaign: int = 1,
                 time_limit: float = DEFAULT_TIME_LIMIT,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 save_failures: Path | None = None, progress: bool = False,
                 first: int = 0) -> tuple[list[Result], dict]:
    """Run cases first..first+cases-1 of `campaign`; returns the results and run facts."""
    from tools.fuzz_cases import build_seeds, make_case, seed_list

    blobs = build_seeds()
    seeds = seed_list(blobs)
    generated = ((n, *make_case(seeds, campaign, n)) for n in range(first, first + cases))
    results, facts = run_cases(generated, blobs, workers, time_limit, memory_limit,
                               save_failures, progress)
    facts["campaign"] = campaign
    return results, facts


def run_cases(cases: Iterable[Case], seeds: dict[str, bytes], workers: int = 2,
              time_limit: float = DEFAULT_TIME_LIMIT,
              memory_limit: int = DEFAULT_MEMORY_LIMIT,
              save_failures: Path | None = None,
              progress: bool = False) -> tuple[list[Result], dict]:
    """Run `cases` on `workers` worker processes (which warm up on `seeds`)."""
    scratch = Path(tempfile.mkdtemp(prefix="wp-fuzz-", dir=_scratch_root()))
    seeds_dir = scratch / "seeds"
    seeds_dir.mkdir()
    for name, blob in seeds.items():
        (seeds_dir / f"{name}.fb").write_bytes(blob)
    results: list[Result] = []
    started = time.perf_counter()
    pool = _Pool(seeds_dir, scratch, workers, memory_limit, time_limit)
    pending = iter(cases)
    try:
        pool.start()
        reported = 0
        for slot in range(workers):
            pool.feed(slot, next(pending, None))
        while pool.busy():
            for slot, result, case in pool.wait():
                results.append(result)
                if save_failures and (result.outcome not in GOOD
                                      or result.peak_bytes > result.bound):
                    _save(result, case[3], save_failures)
                pool.feed(slot, next(pending, None))
            if progress and len(results) >= reported + 1000:
                reported = len(results)
                rate = len(results) / (time.perf_counter() - started)
                print(f"{len(results):,} cases, {rate:.1f}/s, bad so far: "
                      f"{sum(r.outcome not in GOOD for r in results)}", flush=True)
    finally:
        pool.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    facts = {"seconds": time.perf_counter() - started, "workers": workers,
             "time_limit": time_limit, "memory_limit": memory_limit,
             "baseline": pool.baseline, "seeds": {n: len(b) for n, b in seeds.items()}}
    return sorted(results, key=lambda r: r.number), facts


class _Pool:
    """Worker processes with one case each at most; replaces workers that die, hang, or have
    run RECYCLE_EVERY cases."""

    def __init__(self, seeds_dir: Path, scratch: Path, size: int, memory_limit: int,
                 time_limit: float):
        self.seeds_dir, self.scratch = seeds_dir, scratch
        self.memory_limit, self.time_limit = memory_limit, time_limit
        self.workers: list[Worker | None] = [None] * size
        self.cases: list[Case | None] = [None] * size
        self.selector = selectors.DefaultSelector()
        self.baseline = 0

    def start(self) -> None:
        for slot in range(len(self.workers)):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        w = Worker(self.seeds_dir, self.scratch / f"worker{slot}.log", self.memory_limit)
        self.workers[slot] = w
        w.wait_ready(300)
        self.baseline = max(self.baseline, w.baseline)
        self.selector.register(w.results, selectors.EVENT_READ, slot)

    def _replace(self, slot: int) -> int | None:
        w = self.workers[slot]
        self.selector.unregister(w.results)
        status = w.stop()
        self._spawn(slot)
        return status

    def feed(self, slot: int, case: Case | None) -> None:
        self.cases[slot] = case
        if case is not None:
            path = self.scratch / f"case{slot}.fb"
            path.write_bytes(case[3])
            self.workers[slot].send(path, self.time_limit)

    def busy(self) -> bool:
        return any(c is not None for c in self.cases)

    def wait(self) -> list[tuple[int, Result, Case]]:
        """Block until some case ends (done, crashed or over time); return those."""
        deadline = min(self.workers[s].deadline for s, c in enumerate(self.cases) if c)
        ended = []
        for key, _ in self.selector.select(max(0.0, deadline - time.monotonic())):
            slot = key.data
            w, case = self.workers[slot], self.cases[slot]
            if case is None:  # an idle worker died: replace it, nothing to report
                self._replace(slot)
                continue
            line = w.results.readline()
            if line:
                ended.append((slot, _result(case, json.loads(line)), case))
                w.done += 1
                if w.done >= RECYCLE_EVERY:
                    self._replace(slot)
            else:
                ended.append((slot, _lost(case, "crash", _death(self._replace(slot))), case))
            self.cases[slot] = None
        for slot, case in enumerate(self.cases):
            w = self.workers[slot]
            # (a result already waiting was in time: replacing a worker above may have taken
            # the parent past this deadline, not the case)
            if (case is not None and time.monotonic() > w.deadline
                    and not select.select([w.results], [], [], 0)[0]):
                self._replace(slot)
                ended.append((slot, _lost(case, "hang", f"over {self.time_limit:g} s"), case))
                self.cases[slot] = None
        return ended

    def stop(self) -> None:
        for w in self.workers:
            if w is not None:
                w.stop()


def _scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _result(case: Case, raw: dict) -> Result:
    number, seed, mutator, blob = case
    return Result(number, seed, mutator, raw["outcome"], raw.get("detail", ""),
                  raw.get("step", ""), raw.get("message", ""), raw["seconds"],
                  raw["peak_bytes"], len(blob), raw.get("declared_bytes", 0))


def _lost(case: Case, outcome: str, detail: str) -> Result:
    number, seed, mutator, blob = case
    return Result(number, seed, mutator, outcome, detail, file_bytes=len(blob))


def _save(result: Result, blob: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"case{result.number}-{result.mutator}-{result.outcome}"
    (folder / f"{stem}.fb").write_bytes(blob)
    (folder / f"{stem}.json").write_text(json.dumps(asdict(result), indent=1))


# --- the report ---------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f}"


def summarize(results: list[Result], facts: dict) -> tuple[str, bool]:
    """The Markdown body of docs/results/fuzz.md and whether every bar holds."""
    from tools.bench._common import md_table, verdict
    from tools.fuzz_cases import MUTATORS

    by_mutator = collections.defaultdict(collections.Counter)
    by_seed = collections.defaultdict(collections.Counter)
    errors = collections.Counter()
    for r in results:
        by_mutator[r.mutator][r.outcome] += 1
        by_seed[r.seed][r.outcome] += 1
        if r.outcome == "project_error":
            errors[r.detail] += 1
    bad = [r for r in results if r.outcome not in GOOD]
    over = [r for r in results if r.outcome in GOOD and r.peak_bytes > r.bound]
    slowest = max(results, key=lambda r: r.seconds)
    worst = max(results, key=lambda r: r.peak_bytes / r.bound)
    biggest = max(results, key=lambda r: r.peak_bytes)
    times = sorted(r.seconds for r in results)
    total = len(results)
    ok = not bad and not over and total > 0

    rows = [[m, f"{sum(c.values()):,}", *(f"{c[o]:,}" for o in OUTCOMES)]
            for m, c in sorted(by_mutator.items(), key=lambda kv: list(MUTATORS).index(kv[0]))]
    rows.append(["**all**", f"{total:,}",
                 *(f"{sum(r.outcome == o for r in results):,}" for o in OUTCOMES)])
    lines = [
        "## Bars", "",
        f"- **{verdict(not bad)}** every outcome a loaded model or the project's own exception "
        f"({len(bad)} crash / hang / other of {total:,} cases)",
        f"- **{verdict(not over)}** peak memory within the bound below in every case "
        f"({len(over)} over; worst case at {worst.peak_bytes / worst.bound:.1%} of its bound)",
        f"- **{verdict(total >= 100_000)}** at least 100,000 cases ({total:,})", "",
        "## Setup", "",
        f"- campaign seed {facts['campaign']}, {facts['workers']} worker processes, "
        f"{total:,} cases in {facts['seconds'] / 60:.1f} min "
        f"({total / facts['seconds']:.1f} cases/s)",
        f"- each case: a time limit of {facts['time_limit']:g} s, an address-space limit "
        f"(RLIMIT_AS) of {_mib(facts['memory_limit'])} MiB above the worker's, and the resident "
        "high-water mark reset before it (`/proc/self/clear_refs`), so `ru_maxrss` is the "
        "case's own peak",
        "- a case: open and validate, the inspect report (formatted), verify, `runtime.load` "
        "and a forward pass (stored graphs: also `runtime.load(backend=\"onnx\")`); when the "
        "architecture refuses the file, every tensor is decoded anyway",
        "- seeds (bytes): " + ", ".join(f"{n} {b:,}" for n, b in facts["seeds"].items()), "",
        "## Outcomes per mutator", "",
        md_table(["mutator", "cases", *OUTCOMES], rows), "",
        "## Project exceptions raised", "",
        md_table(["exception", "cases"], [[e, f"{n:,}"] for e, n in errors.most_common()]), "",
        "## Outcomes per seed", "",
        md_table(["seed", "cases", *OUTCOMES],
                 [[s, f"{sum(c.values()):,}", *(f"{c[o]:,}" for o in OUTCOMES)]
                  for s, c in sorted(by_seed.items())]), "",
        "## Time and memory", "",
        f"- time per case: median {statistics.median(times) * 1000:.0f} ms, 99th percentile "
        f"{times[int(0.99 * (total - 1))] * 1000:.0f} ms, max {slowest.seconds:.2f} s "
        f"(case {slowest.number}, {slowest.mutator} on {slowest.seed}, {slowest.outcome} "
        f"{slowest.detail})",
        f"- memory bound: peak <= baseline + {_mib(MEMORY_A)} MiB + {MEMORY_B} x file_bytes "
        f"+ {MEMORY_C} x declared_bytes, where declared_bytes = decompressed index bytes + "
        "the decoded bytes (elements x item size) of every tensor the index declares, and "
        f"baseline = the worker's resident size before the case (at most "
        f"{_mib(facts['baseline'])} MiB after start-up: torch, onnx, onnxruntime)",
        f"- largest peak above baseline: {_mib(biggest.peak_bytes)} MiB (case {biggest.number},"
        f" {biggest.mutator} on {biggest.seed}: file {biggest.file_bytes:,} B, declared "
        f"{biggest.declared_bytes:,} B, bound {_mib(biggest.bound)} MiB)",
        f"- closest to the bound: {worst.peak_bytes / worst.bound:.1%} (case {worst.number}, "
        f"{worst.mutator} on {worst.seed}: peak {_mib(worst.peak_bytes)} MiB, file "
        f"{worst.file_bytes:,} B, declared {worst.declared_bytes:,} B)",
    ]
    if bad or over:
        lines += ["", "## Failures", "",
                  md_table(["case", "seed", "mutator", "outcome", "detail", "step", "message"],
                           [[r.number, r.seed, r.mutator, r.outcome, r.detail, r.step,
                             r.message.replace("|", "/")[:120]] for r in (bad + over)[:50]])]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--first", type=int, default=0, help="number of the first case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--campaign", type=int, default=1, help="seed of the case generator")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT)
    parser.add_argument("--memory-limit-mib", type=int, default=DEFAULT_MEMORY_LIMIT >> 20)
    parser.add_argument("--save-failures", type=Path, help="write failing cases' files here")
    parser.add_argument("--write", action="store_true", help="write docs/results/fuzz.md")
    parser.add_argument("--allow-dirty", action="store_true")
    parser.add_argument("--replay", type=int, help="only write case N's file to --save")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args(argv)
    if args.replay is not None:
        from tools.fuzz_cases import build_seeds, make_case, seed_list

        seed, mutator, blob = make_case(seed_list(build_seeds()), args.campaign, args.replay)
        target = args.save or Path(f"case{args.replay}.fb")
        target.write_bytes(blob)
        print(f"case {args.replay}: {mutator} on {seed} -> {target} ({len(blob):,} bytes)")
        return 0
    from tools.bench._common import refuse_dirty_tree, write_results

    if args.write:
        refuse_dirty_tree(args.allow_dirty)
    results, facts = run_campaign(args.cases, args.workers, args.campaign, args.time_limit,
                                  args.memory_limit_mib << 20, args.save_failures,
                                  progress=True, first=args.first)
    body, ok = summarize(results, facts)
    if args.write:
        command = "python tools/fuzz.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--allow-dirty")
        path = write_results("fuzz", "Loader fuzz campaign (issue 10)", command, body)
        print(f"wrote {path}")
    print(body)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
