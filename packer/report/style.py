"""One look for every figure: headless Agg canvases, the colours of before/after, colour maps.

Figures are made with matplotlib's object API (`Figure` + an Agg canvas), never pyplot: no
global figure registry to leak memory in a long report, and no display backend is needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

BEFORE = "#3b75af"  # blue: the reference (original) model, as in the seed's scatter
AFTER = "#ef8636"  # orange: the compressed model
MARK = "#c0392b"  # codebook values
PARTS = {"indices": "#3b75af", "codebook": "#ef8636", "raw": "#9a9a9a"}

STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "figure.titlesize": 11,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
}


def styled() -> contextlib.AbstractContextManager:
    """The report's font sizes, for figures made inside; a notebook's own settings are kept."""
    return matplotlib.rc_context(STYLE)


def new_figure(width: float, height: float) -> Figure:
    """A figure of exactly width x height inches, drawn by Agg (PNG without a display)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass(frozen=True)
class Margins:
    """Space around and between the panels of a grid, in inches."""

    left: float
    right: float
    top: float
    bottom: float
    wgap: float
    hgap: float


def grid_figure(rows: int, columns: int, panel_width: float, panel_height: float,
                m: Margins) -> tuple[Figure, np.ndarray]:
    """A figure sized to hold rows x columns panels of the given size, with fixed margins.

    Pages of many small panels use this rather than constrained layout, which measures every
    tick label of every panel again on each save: a third of the drawing time of a page.
    """
    width = m.left + columns * panel_width + (columns - 1) * m.wgap + m.right
    height = m.top + rows * panel_height + (rows - 1) * m.hgap + m.bottom
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": m.left / width, "right": 1 - m.right / width, "top": 1 - m.top / height,
        "bottom": m.bottom / height, "wspace": m.wgap / panel_width,
        "hspace": m.hgap / panel_height})
    return fig, axes


def diverging() -> Colormap:
    """Signed weights: blue below zero, red above, white at zero; NaN (tile gaps) grey."""
    return matplotlib.colormaps["RdBu_r"].with_extremes(bad="#8c8c8c")


def sequential() -> Colormap:
    """Non-negative values (ReLU outputs): dark at zero; NaN (tile gaps) white."""
    return matplotlib.colormaps["magma"].with_extremes(bad="white")
