"""The `packer compress` flags of the post-training tools, kept beside them (cli.py adds
them with one call and passes them on with another)."""

from __future__ import annotations

import argparse
import re
from typing import Any

# Defined here, not beside their implementations, so `packer --help` answers without torch.
REPAIRS = ("bn", "bias")  # data-aware repairs, in the order they run (packer.ptq.repair)
MEASURES = ("fisher", "kl")  # sensitivity measures (packer.ptq.sensitivity)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from '99279', '97k', '1.5MB' or '2MiB'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(f"expected bytes such as 99279, 97k or 1.5MB, "
                                         f"got {text!r}")
    return int(float(match.group(1)) * unit)


def parse_repairs(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in REPAIRS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(REPAIRS)} "
                                         f"or none, got {text!r}")
    return parts


def add_flags(c: argparse.ArgumentParser) -> None:
    budget = c.add_argument_group(
        "size budget (uniform, kmeans, pqf; needs --calib-data; see docs/BUDGET.md)")
    goal = budget.add_mutually_exclusive_group()
    goal.add_argument("--target-size", type=parse_size, metavar="BYTES",
                      help="the file must fit in BYTES (e.g. 99279, 97k): per-layer rates "
                      "(bits, k) chosen by sensitivity; lands within 1%% under")
    goal.add_argument("--target-ratio", type=float, metavar="R",
                      help="the same as a compression ratio against fp32 (e.g. 10.9)")
    goal.add_argument("--max-drop", type=float, metavar="POINTS",
                      help="the smallest file whose top-1 on held-out calibration images is "
                      "at most POINTS below the uncompressed model's")
    budget.add_argument("--sensitivity", default="fisher", choices=MEASURES,
                        help="per-layer sensitivity: fisher (second-order estimate of the "
                        "output KL, one pass for all candidates; default) or kl (measured, one "
                        "pass per layer and rate)")
    budget.add_argument("--calib-holdout", type=int, default=2000, metavar="N",
                        help="held-out calibration images --max-drop measures top-1 on "
                        "(default 2000; disjoint from the calibration images)")
    c.add_argument("--repair", type=parse_repairs, default=None, metavar="LIST",
                   help="data-aware repair after post-training methods when --calib-data is "
                   "given: bn (re-estimate BatchNorm statistics), bias (bias correction); "
                   "default bn,bias; 'none' to turn off")


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The PackRequest fields these flags set."""
    return {"target_size": args.target_size, "target_ratio": args.target_ratio,
            "max_drop": args.max_drop, "sensitivity": args.sensitivity,
            "calib_holdout": args.calib_holdout, "repair": args.repair}
