"""Option checks and the options WFN and PWFN share (data limits, checkpoint, resume)."""

from __future__ import annotations

from packer.config import Option, closed_interval


def check_schedule(values: list[float], name: str) -> str | None:
    """A cumulative fixing schedule: strictly increasing fractions in (0, 1], ending at 1."""
    if not values:
        return f"{name} must not be empty"
    if any(not 0 < v <= 1 for v in values):
        return f"{name}: every fraction must be in (0, 1]"
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return f"{name} must be strictly increasing"
    if values[-1] != 1.0:
        return f"{name} must end at 1.0 (every weight fixed)"
    return None


def check_epochs(v: int) -> str | None:
    return None if 0 <= v <= 1000 else "epochs must be between 0 and 1000"


RUN_OPTIONS: dict[str, Option] = {
    "train_limit": Option(0, "training images per epoch, drawn at random (0: all)", int,
                          check=closed_interval(0, 10**9, "train_limit"), per_layer=False),
    "val_limit": Option(0, "validation images for the per-round log (0: all)", int,
                        check=closed_interval(0, 10**9, "val_limit"), per_layer=False),
    "checkpoint": Option(None, "checkpoint file, written after every fixing round", str,
                         per_layer=False),
    "resume": Option(False, "continue from `checkpoint`", bool, per_layer=False),
}
"""Options of the fixing loop itself (`packer.methods.weightfix.loop.FixingRun`)."""
