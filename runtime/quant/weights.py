"""Int8 weights: symmetric, per output channel (axis 0), zero point 0, codes in [-127, 127].

This is TensorRT's weight grid. When the packed form of a weight already lies on such a grid
(a Uniform tensor of <= 8 bits, a ternary or power-of-two codebook, a small codebook whose
values are integer multiples of one step per channel) we find that grid, so converting to
int8 adds no error; `Int8Weight.exact` reports it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from runtime.quant.grid import max_scales, round_to_grid
from runtime.tensors import CompressedTensor, UniformTensor

__all__ = ["QMAX", "Int8Weight", "int8_weight"]

QMAX = 127  # symmetric weight range [-127, 127]; -128 is never used (TensorRT)
_MAX_LEVELS = 2 * QMAX + 1  # more distinct values per channel than this cannot be exact


@dataclass(frozen=True)
class Int8Weight:
    """q: int8, the weight's shape; scales: float32 [out channels]; value = q * scale[c]."""

    q: np.ndarray
    scales: np.ndarray
    exact: bool

    def dequantize(self) -> Tensor:
        """float32(q) * scale, exactly what ONNX DequantizeLinear(axis=0) computes."""
        view = (-1,) + (1,) * (self.q.ndim - 1)
        q = torch.from_numpy(self.q.astype(np.float32))
        return q * torch.from_numpy(self.scales).reshape(view)

    def fold(self, factor: np.ndarray) -> Int8Weight:
        """The weight times `factor` per output channel (a folded BatchNorm): same codes,
        scales times |factor|, codes negated where factor < 0; a zero factor zeroes the
        channel. Stays on a symmetric per-channel grid, so an exact weight stays exact."""
        f = np.asarray(factor, dtype=np.float32).reshape(-1)
        if f.size != self.scales.size:
            raise ValueError(f"{f.size} factors for {self.scales.size} output channels")
        view = (-1,) + (1,) * (self.q.ndim - 1)
        scales = (self.scales * np.abs(f)).astype(np.float32)
        live = np.isfinite(scales) & (scales > 0)  # a zero (or underflowing) factor
        sign = np.where(live, np.where(f < 0, -1, 1), 0).astype(np.int8).reshape(view)
        scales = np.where(live, scales, np.float32(1.0)).astype(np.float32)
        return Int8Weight((self.q * sign).astype(np.int8), scales, self.exact)


def _rows(w: Tensor) -> np.ndarray:
    """The weight as float32 [out channels, everything else]."""
    arr = w.detach().to(torch.float32).cpu().numpy()
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)


def _grid_codes(rows: np.ndarray, scales: np.ndarray) -> np.ndarray | None:
    """Integer codes of `rows` under `scales` if every value is exactly code * scale in
    float32 with |code| <= 127, else None."""
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        return None
    codes = np.rint(rows / scales[:, None])
    if np.abs(codes).max(initial=0) > QMAX:
        return None
    if not np.array_equal(codes.astype(np.float32) * scales[:, None], rows):
        return None
    return codes.astype(np.int8)


def _exact_channel_scale(values: np.ndarray) -> np.float32 | None:
    """A float32 step s with every value == float32(q) * s exactly, |q| <= 127, or None.

    The largest magnitude must land on some integer code m in 1..127, so s is near
    peak / m; the float32 neighbours of each candidate cover rounding of that division.
    """
    values = np.unique(values)
    peak = np.float32(np.abs(values).max(initial=0))
    if peak == 0:
        return np.float32(1.0)
    if values.size > _MAX_LEVELS:
        return None
    m = np.arange(1, QMAX + 1, dtype=np.float32)
    base = (peak / m).astype(np.float32)
    cands = np.concatenate([base, np.nextafter(base, np.float32(0)),
                            np.nextafter(base, np.float32(np.inf))])
    cands = cands[cands > 0]
    q = np.rint(values[None, :] / cands[:, None])
    ok = (np.abs(q).max(axis=1) <= QMAX) & np.all(
        q.astype(np.float32) * cands[:, None] == values[None, :], axis=1)
    hits = np.flatnonzero(ok)
    # Prefer the coarsest step (smallest codes): it is the grid the values were made on.
    return np.float32(cands[hits[np.argmax(cands[hits])]]) if hits.size else None


def _own_uniform_scales(compressed: UniformTensor, channels: int) -> np.ndarray | None:
    """A Uniform tensor's own scales per output channel, when its grid is per-axis-0 or
    per-tensor and its codes minus zero points fit the symmetric int8 range."""
    if compressed.bits > 8:
        return None
    scales = compressed.scales.detach().to(torch.float32).cpu().numpy().reshape(-1)
    if compressed.axis is None:
        return np.full(channels, scales[0], dtype=np.float32)
    if compressed.axis == 0 and scales.size == channels:
        return scales.astype(np.float32)
    return None


def _exact_scales(rows: np.ndarray, compressed: CompressedTensor) -> np.ndarray | None:
    if isinstance(compressed, UniformTensor):
        own = _own_uniform_scales(compressed, rows.shape[0])
        if own is not None and _grid_codes(rows, own) is not None:
            return own
    scales = np.empty(rows.shape[0], dtype=np.float32)
    for c, row in enumerate(rows):
        s = _exact_channel_scale(row)
        if s is None:
            return None
        scales[c] = s
    return scales


def int8_weight(w: Tensor, compressed: CompressedTensor | None = None) -> Int8Weight:
    """Quantize a (decoded) weight to int8 per output channel.

    With `compressed` (the packed form `w` was decoded from) we first look for per-channel
    scales under which `w` is exactly representable and report `exact=True`; otherwise (or
    without it) the max / 127 grid of :mod:`runtime.quant.grid`.
    """
    rows = _rows(w)
    if rows.size and compressed is not None:
        scales = _exact_scales(rows, compressed)
        if scales is not None:
            codes = _grid_codes(rows, scales)
            if codes is not None:
                return Int8Weight(codes.reshape(tuple(w.shape)), scales, True)
    grid_rows = torch.from_numpy(rows)
    scales_t = max_scales(grid_rows, QMAX)
    scales = scales_t.numpy()
    codes = round_to_grid(grid_rows, scales_t, QMAX).numpy().astype(np.int8)
    exact = bool(np.array_equal(codes.astype(np.float32) * scales[:, None], rows))
    return Int8Weight(codes.reshape(tuple(w.shape)), scales, exact)
