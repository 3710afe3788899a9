"""What WFN and PWFN tell the user: one log line per fixing round, and the final report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from packer.methods.weightfix.fixed import FixedParams
from runtime.distributed import rank
from runtime.quant.weights import int8_weight
from runtime.tensors import ScalarCodebookTensor


@dataclass
class IterationLog:
    """Per-iteration records, printed to stderr as they come (one line each, progress bars
    or not: long runs under nohup need them) and kept for the report."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if rank() == 0:
            top1 = record.get("top1")
            print(f"{self.method} {record['iteration']}/{record['iterations']}: "
                  f"fixed {100 * record['fixed_fraction']:.2f}%, "
                  f"{record['centres']} centres, entropy {record['entropy_bits']:.3f} b"
                  + (f", top-1 {top1:.2f}%" if top1 is not None else "")
                  + f" ({record['seconds']:.0f} s)", file=sys.stderr)


def iteration_record(iteration: int, iterations: int, fixed: FixedParams,
                     top1: float | None, started: float, **extra: Any) -> dict[str, Any]:
    stats = fixed.stats()
    return {"iteration": iteration, "iterations": iterations,
            "fixed_fraction": round(fixed.fixed_fraction(), 6),
            "centres": int(fixed.centres().numel()), **stats, "top1": top1,
            "seconds": round(time.perf_counter() - started, 2), **extra}


def final_report(fixed: FixedParams, compressed: dict[str, ScalarCodebookTensor],
                 log: IterationLog, timings: dict[str, float]) -> dict[str, Any]:
    """unique values and entropy (both conventions), per-layer int8 exactness, the log."""
    int8_exact = {}
    for name, tensor in compressed.items():
        if name.endswith(".weight") and tensor.indices.dim() >= 2:
            int8_exact[name] = int8_weight(tensor.dequantize(), tensor).exact
    return {**fixed.stats(), "centres": int(fixed.centres().numel()),
            "fixable_parameters": fixed.numel,
            "int8_exact_layers": int8_exact,
            "int8_exact_count": f"{sum(int8_exact.values())}/{len(int8_exact)}",
            f"{log.method}_iterations": log.records, f"{log.method}_timings": timings}
