"""Post-training tools shared by every method: calibration images, per-layer sensitivity,
the size-budget search, AdaRound learned rounding, and data-aware repair (docs/BUDGET.md)."""
