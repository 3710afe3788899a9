"""Size and speed of every coder on synthetic streams (the numbers in docs/CODERS.md).

Run: ``python -m runtime.coders._bench [--count N] [--repeat R]``. Timings are the best of
``R`` runs, so one-off page faults of the first run do not count.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from runtime.coders import CODERS, decode, encode, entropy_bits

T = TypeVar("T")


def _streams(n: int) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    zero70 = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 16, n))
    return {
        "16-level dense": (rng.integers(0, 16, n), 16),
        "16-level 70%-zero": (zero70, 16),
        "256-level dense": (rng.integers(0, 256, n), 256),
    }


def _best(repeat: int, fn: Callable[..., T], *args: object) -> tuple[float, T]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.count
    print(f"{n:,} symbols, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    for name, (symbols, k) in _streams(n).items():
        h = entropy_bits(symbols, k)
        bound = h * n / 8
        print(f"\n{name} (K={k}): entropy {h:.4f} bits/symbol = {bound:,.0f} bytes")
        print("| coder | payload B | params B | total / entropy | encode Msym/s | decode Msym/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for coder in CODERS:
            t_enc, stream = _best(args.repeat, encode, symbols, k, coder)
            t_dec, out = _best(args.repeat, decode, stream, n, k)
            if not np.array_equal(out, symbols):
                raise SystemExit(f"{coder} failed to round-trip {name}")
            print(
                f"| {coder} | {len(stream.payload):,} | {stream.params_nbytes():,} | "
                f"{stream.nbytes / bound:.4f} | {n / t_enc / 1e6:.1f} | {n / t_dec / 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
