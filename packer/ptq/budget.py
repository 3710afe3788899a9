"""Size budgets: `--target-size BYTES`, `--target-ratio R` and `--max-drop POINTS`.

1. Candidates: every budgeted layer compressed alone at each rate its method declares
   (`Method.knob` / `candidate_rates`: uniform step_rms or bits, kmeans and pqf k), each
   encoded by the packer's own encoder: its true coded bytes (stream payload, coder tables,
   codebooks or scales).
2. Sensitivity of each candidate on the calibration images (packer.ptq.sensitivity).
3. A probe file with every layer at its smallest candidate gives the smallest file and the
   fixed bytes of everything else (raw tensors, index, padding).
4. Exact multiple-choice knapsack (packer.ptq.knapsack): least total sensitivity within the
   bytes left, aiming inside [99%, 100%] of the budget. The file is then built for real
   and measured; if it misses the window (rounding learned on data changes code
   statistics, the index compresses differently), the byte model is corrected with the
   measured sizes and the search runs again.

`--max-drop` walks the same search's solutions from small to large budgets (binary search)
and keeps the smallest whose top-1 on the held-out calibration split is within the drop.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from packer.config import MethodConfig
from packer.encode import DataSection, EncodedTensor, Encoder
from packer.methods.base import CompressJob, Method
from packer.ptq import knapsack
from packer.ptq.sensitivity import layer_sensitivities
from runtime.errors import ConfigError
from runtime.tensors import CompressedTensor

WINDOW = 0.01  # the file lands within 1% under the budget
MAX_ATTEMPTS = 6
DROP_GRID = 32  # budgets tried by --max-drop (binary search over them)


@dataclass(frozen=True)
class BudgetGoal:
    """What the user asked for: a size in bytes, or an accuracy drop in points."""

    size: int | None = None
    max_drop: float | None = None
    asked: str = ""  # the flag as typed, for messages


@dataclass
class LayerRates:
    """One budgeted layer: its candidate rates, their true bytes and sensitivities."""

    name: str  # weight tensor name
    numel: int
    rates: list[float | None]  # the knob's values, by bytes ascending (None: user's setting)
    bytes: list[int]
    distortion: list[float]
    fixed: str = ""  # the user's own setting for this layer (not searched), e.g. "bits=8"

    def options(self) -> list[knapsack.Option]:
        return [knapsack.Option(b, d) for b, d in zip(self.bytes, self.distortion,
                                                      strict=True)]


class Built(Protocol):
    size: int

    def layer_bytes(self, name: str) -> int: ...


def encoded_bytes(encoded: EncodedTensor) -> int:
    """What an encoded tensor costs in the file: coded streams (with coder tables) and
    arrays (codebooks, scales)."""
    return (sum(s.coded_bytes for s in encoded.streams)
            + sum(a.blob.length for _, a in encoded.record.arrays()))


def coded_bytes(name: str, tensor: CompressedTensor, coder: str, alignment: int) -> int:
    """What the tensor costs in the file, encoded alone by the packer's encoder."""
    return encoded_bytes(Encoder(DataSection(alignment), coder).tensor(name, tensor))


def user_setting(config: MethodConfig, settings: tuple[str, ...], name: str) -> str:
    """The rate setting the user gave this layer with GLOB.option=... ('' for none)."""
    module = name.rsplit(".", 1)[0]
    opts = config.for_tensor(name)
    for glob, values in config.layers:
        if fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(name, glob):
            for key in settings:
                if key in values:
                    return f"{key}={opts[key]}"
    return ""


def with_rates(config: MethodConfig, option: str,
               rates: dict[str, float | None]) -> MethodConfig:
    """The configuration plus one exact per-layer setting per searched layer."""
    layers = list(config.layers) + [(name, {option: rate}) for name, rate in rates.items()
                                    if rate is not None]
    return MethodConfig(config.method, dict(config.options), layers)


def check_method(method: Method, name: str, asked: str) -> str:
    """The method's rate knob, or one clear error naming the methods that have one."""
    if method.rate_option is None:
        from packer.methods import METHODS
        knobs = ", ".join(n for n, m in METHODS.items() if m.rate_option)
        raise ConfigError(f"{asked}: method {name} has no per-layer rate knob to "
                          f"size; methods with one: {knobs}")
    return method.rate_option


@dataclass
class Measured:
    layers: list[LayerRates]
    lowest: dict[str, CompressedTensor]  # every layer at its lowest rate (the probe)
    report: dict[str, Any] = field(default_factory=dict)


def measure_layers(method: Method, job: CompressJob, measure: str, coder_for: Callable[[str], str],
                   alignment: int, cache: dict | None, cache_key: str) -> Measured:
    """Candidates, their true bytes and sensitivities for every budgeted layer."""
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    started = time.perf_counter()
    option = method.knob(job.config)
    method.prepare_candidates(job)
    names = method.budget_layers(job)
    if not names:
        raise ConfigError(f"{method.name}: no layer has a rate to choose")
    settings = method.rate_settings or (option,)
    rates: dict[str, list[float | None]] = {}
    fixed = {n: user_setting(job.config, settings, n) for n in names}
    for name in names:
        rates[name] = [None] if fixed[name] else list(method.candidate_rates(job, name))
    sizes: dict[str, dict[float | None, int]] = {n: {} for n in names}
    smallest: dict[str, tuple[int, CompressedTensor]] = {}

    def count(name: str, rate: float | None, tensor: CompressedTensor) -> None:
        size = coded_bytes(name, tensor, coder_for(name), alignment)
        sizes[name][rate] = size
        if name not in smallest or size < smallest[name][0]:
            smallest[name] = (size, tensor)

    assert job.calib is not None
    distortion, timings = layer_sensitivities(
        job.model, rates, lambda n, r: method.layer_candidate(job, n, r), count,
        list(job.calib.batches()), measure, job.progress)
    layers = []
    for n in names:
        order = sorted(range(len(rates[n])), key=lambda i, n=n: sizes[n][rates[n][i]])
        layers.append(LayerRates(n, job.state_dict[n].numel(), [rates[n][i] for i in order],
                                 [sizes[n][rates[n][i]] for i in order],
                                 [distortion[n][i] for i in order], fixed[n]))
    lowest = {n: t for n, (_, t) in smallest.items()}
    report = {"measure": measure, "images": int(job.calib.images.shape[0]),
              "seconds": round(time.perf_counter() - started, 2), **timings,
              "candidates": sum(len(r) for r in rates.values())}
    result = Measured(layers, lowest, report)
    if cache is not None:
        cache[cache_key] = result
    return result


def _fit_choice(layers: list[LayerRates], costs: list[list[int]], low: int, high: int
                ) -> list[int] | None:
    """Least-distortion choice whose predicted layer bytes are in [low, high] if there is
    one, else the least-distortion choice under `high` (None: nothing fits)."""
    opts = [[knapsack.Option(b, d) for b, d in zip(c, layer.distortion, strict=True)]
            for c, layer in zip(costs, layers, strict=True)]
    choice = knapsack.solve(opts, high, floor=max(0, low))
    return choice if choice is not None else knapsack.solve(opts, high)


def fit_size(layers: list[LayerRates], target: int, probe_size: int,
             build: Callable[[dict[str, int]], Built], option: str,
             progress: Callable[[str], None] | None = None) -> tuple[Built, dict[str, Any]]:
    """Build the least-distortion file within [99%, 100%] of `target` bytes."""
    lowest_sum = sum(layer.bytes[0] for layer in layers)
    if target < probe_size:
        raise ConfigError(
            f"the budget of {target:,} bytes is below the smallest possible file, "
            f"{probe_size:,} bytes (every layer at its smallest {option}); ask for at "
            f"least that")
    overhead = probe_size - lowest_sum
    costs = [list(layer.bytes) for layer in layers]
    attempts: list[dict[str, Any]] = []
    tried: dict[tuple[int, ...], Built] = {}
    best: tuple[int, Built, list[int]] | None = None
    margin = max(1, int(0.001 * target))  # aim a little inside the window
    for _ in range(MAX_ATTEMPTS):
        high = target - overhead - margin
        low = int((1 - WINDOW) * target) - overhead + margin
        choice = _fit_choice(layers, costs, low, high)
        if choice is None:
            choice = [0] * len(layers)
        key = tuple(choice)
        predicted = overhead + sum(costs[i][c] for i, c in enumerate(choice))
        if key in tried:
            break  # the byte model is exact for this choice: nothing closer fits the window
        built = build({layers[i].name: layers[i].rates[c] for i, c in enumerate(choice)})
        tried[key] = built
        attempts.append({"predicted_bytes": predicted, "file_bytes": built.size})
        if progress:
            progress(f"budget attempt {len(attempts)}: predicted {predicted:,} B, "
                     f"file {built.size:,} B, target {target:,} B")
        if built.size <= target and (best is None or built.size > best[0]):
            best = (built.size, built, choice)
        if (1 - WINDOW) * target <= built.size <= target:
            break
        # Correct the byte model with what this file measured: exact for the chosen
        # candidates, the same ratio for a layer's others; the rest is fixed overhead.
        actual = 0
        for i, c in enumerate(choice):
            measured = built.layer_bytes(layers[i].name)
            if measured != costs[i][c] and costs[i][c] > 0:
                ratio = measured / costs[i][c]
                costs[i] = [round(b * ratio) for b in costs[i]]
                costs[i][c] = measured
            actual += measured
        overhead = built.size - actual
    if best is None:
        raise ConfigError(f"no file within the budget of {target:,} bytes could be built "
                          f"(smallest tried: {min(a['file_bytes'] for a in attempts):,} bytes)")
    size, built, choice = best
    report = {"target_bytes": target, "file_bytes": size,
              "fill": round(size / target, 5),
              "within_window": bool((1 - WINDOW) * target <= size <= target),
              "attempts": attempts, "fixed_bytes": overhead,
              "smallest_file_bytes": probe_size,
              "layers": layer_table(layers, choice, built, option),
              "predicted_kl": round(sum(layers[i].distortion[c] for i, c in enumerate(choice)),
                                    6)}
    return built, report


def fit_drop(layers: list[LayerRates], max_drop: float, probe_size: int,
             build: Callable[[dict[str, int]], Built], top1: Callable[[Built], float],
             baseline: float, option: str,
             progress: Callable[[str], None] | None = None) -> tuple[Built, dict[str, Any]]:
    """The smallest file whose held-out top-1 is at most `max_drop` points below the
    uncompressed model's, among the knapsack's solutions on a grid of budgets."""
    overhead = probe_size - sum(layer.bytes[0] for layer in layers)
    low = sum(layer.bytes[0] for layer in layers)
    high = sum(layer.bytes[-1] for layer in layers)
    options = [layer.options() for layer in layers]
    grid: list[list[int]] = []
    for i in range(DROP_GRID + 1):
        cap = round(low * (high / low) ** (i / DROP_GRID)) if low > 0 else high
        choice = knapsack.solve(options, cap)
        if choice is not None and (not grid or choice != grid[-1]):
            grid.append(choice)
    evaluated: dict[int, tuple[Built, float]] = {}

    def run(index: int) -> float:
        if index not in evaluated:
            choice = grid[index]
            built = build({layers[i].name: layers[i].rates[c] for i, c in enumerate(choice)})
            acc = top1(built)
            evaluated[index] = (built, acc)
            if progress:
                progress(f"max-drop: {built.size:,} B, held-out top-1 {acc:.2f} "
                         f"(baseline {baseline:.2f})")
        return baseline - evaluated[index][1]

    lo, hi = 0, len(grid) - 1
    if run(hi) > max_drop:
        found = hi  # even the largest setting misses: say so, keep the best there is
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if run(mid) <= max_drop:
                hi = mid
            else:
                lo = mid + 1
        found = hi
    run(found)
    built, acc = evaluated[found]
    report = {"max_drop": max_drop, "holdout_top1": round(acc, 3),
              "holdout_baseline_top1": round(baseline, 3),
              "holdout_drop": round(baseline - acc, 3),
              "met": baseline - acc <= max_drop, "file_bytes": built.size,
              "fixed_bytes": overhead, "smallest_file_bytes": probe_size,
              "evaluated": [{"file_bytes": b.size, "holdout_top1": round(a, 3)}
                            for _, (b, a) in sorted(evaluated.items())],
              "layers": layer_table(layers, grid[found], built, option)}
    return built, report


def layer_table(layers: list[LayerRates], choice: list[int], built: Built,
                option: str) -> list[dict[str, Any]]:
    """Per layer: the chosen rate, its bytes and sensitivity, and what one step either way
    would have traded (why the search stopped there)."""
    rows = []
    for layer, c in zip(layers, choice, strict=True):
        row: dict[str, Any] = {"name": layer.name, "numel": layer.numel,
                               option: layer.rates[c] if not layer.fixed else layer.fixed,
                               "bytes": built.layer_bytes(layer.name),
                               "kl": float(f"{layer.distortion[c]:.4g}")}
        if layer.fixed:
            row["why"] = "set by the user"
        else:
            if c + 1 < len(layer.rates):
                row["up"] = {option: layer.rates[c + 1],
                             "bytes": layer.bytes[c + 1] - layer.bytes[c],
                             "kl": float(f"{layer.distortion[c + 1] - layer.distortion[c]:.3g}")}
            if c > 0:
                row["down"] = {option: layer.rates[c - 1],
                               "bytes": layer.bytes[c - 1] - layer.bytes[c],
                               "kl": float(f"{layer.distortion[c - 1] - layer.distortion[c]:.3g}")}
        rows.append(row)
    return rows


def _per_kb(step: dict[str, Any]) -> str:
    if step["bytes"] == 0:
        return "same bytes"
    return f"{abs(step['kl']) / abs(step['bytes']) * 1000:.2g}/KB"


def format_budget(report: dict[str, Any], option: str) -> str:
    """The per-layer table `packer compress` prints under a budget."""
    lines = []
    if "target_bytes" in report:
        lines.append(f"budget      {report['target_bytes']:,} B asked, "
                     f"file {report['file_bytes']:,} B "
                     f"({100 * report['fill']:.2f}% of it"
                     f"{'' if report['within_window'] else ', NOT within 1% under'}), "
                     f"{len(report['attempts'])} build(s); smallest possible "
                     f"{report['smallest_file_bytes']:,} B")
    else:
        lines.append(f"max-drop    {report['max_drop']} pts asked: held-out top-1 "
                     f"{report['holdout_top1']:.2f} vs {report['holdout_baseline_top1']:.2f} "
                     f"(drop {report['holdout_drop']:.2f}{'' if report['met'] else ', NOT met'}), "
                     f"file {report['file_bytes']:,} B")
    sens = report.get("sensitivity", {})
    if sens:
        lines.append(f"sensitivity {sens['measure']} on {sens['images']} calibration images, "
                     f"{sens['seconds']:.1f} s; kl = predicted output KL (nats/image) of "
                     f"that layer alone")
    lines.append(f"{'layer':<28} {option:>8} {'bytes':>8} {'kl':>10}  why (the next candidate "
                 f"with fewer / more bytes)")
    for row in report["layers"]:
        why = row.get("why", "")
        if not why:
            parts = [f"{option}={step[option]}: {step['bytes']:+,} B, kl {step['kl']:+.2g} "
                     f"({_per_kb(step)})" for step in (row.get("down"), row.get("up")) if step]
            why = "; ".join(parts)
        lines.append(f"{row['name']:<28} {row[option]!s:>8} {row['bytes']:>8,} "
                     f"{row['kl']:>10.3g}  {why}")
    return "\n".join(lines)


def cache_key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)
