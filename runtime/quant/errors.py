"""User-facing errors of 8-bit inference (all WeightpackError, so CLIs print one line)."""

from __future__ import annotations

from runtime.errors import WeightpackError


class QuantError(WeightpackError):
    """A model, graph or option cannot be quantized to int8 as asked."""


class NoActivationScales(QuantError):
    """The packed file has no calibrated activation scales and none were given."""


class CalibrationError(QuantError):
    """Calibration saw no data, or was asked for an unknown method."""
