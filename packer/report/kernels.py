"""Kernel heatmaps (the seed's display_kernel): each spatial convolution's kernels averaged over
input channels, one tile per output channel, drawn as one mosaic image per model."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from matplotlib.figure import Figure

from packer.report.models import ModelView
from packer.report.style import Margins, diverging, grid_figure

PANEL = 3.9  # inches: the width of one model's mosaic
KERNEL_MARGINS = Margins(left=0.75, right=1.25, top=0.9, bottom=0.65, wgap=0.85, hgap=0.0)


def spatial_convs(view: ModelView) -> list[str]:
    """4-D weights with a spatial kernel (1x1 convolutions average to a single number)."""
    shapes = {n: view.weights[n].shape for n in view.weight_names()}
    return [n for n, s in shapes.items() if len(s) == 4 and s[2] * s[3] > 1]


def mosaic(tiles: np.ndarray, columns: int) -> np.ndarray:
    """[n, h, w] tiles -> one 2-D image, `columns` tiles a row, NaN one-pixel gaps between."""
    n, h, w = tiles.shape
    rows = math.ceil(n / columns)
    image = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        image[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tiles[i]
    return image


def kernel_figures(after: ModelView, before: ModelView | None, max_layers: int,
                   max_kernels: int) -> Iterator[tuple[str, str, Figure]]:
    for index, name in enumerate(spatial_convs(after)[:max_layers]):
        views = [before, after] if before else [after]
        means = [v.weights[name].detach().float().mean(dim=1)[:max_kernels].numpy()
                 for v in views]
        fig = _kernel_figure(name, after.weights[name], views, means)
        yield (f"kernels_{index + 1:02d}", f"Kernels of {name}, averaged over input channels.",
               fig)


def _kernel_figure(name: str, weight: torch.Tensor, views: list[ModelView],
                   means: list[np.ndarray]) -> Figure:
    out_ch, in_ch, kh, kw = weight.shape
    shown = means[0].shape[0]
    columns = math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / columns)
    vmax = max(float(np.abs(m).max()) for m in means) or 1.0
    aspect = (rows * (kh + 1) - 1) / (columns * (kw + 1) - 1)
    fig, axes = grid_figure(1, len(views), PANEL, PANEL * aspect, KERNEL_MARGINS)
    axes = axes[0]
    image = None
    for ax, view, m in zip(axes, views, means, strict=True):
        image = ax.imshow(mosaic(m, columns), cmap=diverging(), vmin=-vmax, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(view.label)
        ax.set_xticks([c * (kw + 1) + (kw - 1) / 2 for c in range(columns)],
                      [f"+{c}" for c in range(columns)])
        ax.set_yticks([r * (kh + 1) + (kh - 1) / 2 for r in range(rows)],
                      [str(r * columns) for r in range(rows)])
        ax.set_xlabel("output channel: row start + offset")
        ax.set_ylabel("output channel")
    width, _ = fig.get_size_inches()
    box = axes[-1].get_position()
    bar = fig.add_axes((box.x1 + 0.2 / width, box.y0, 0.15 / width, box.height))
    fig.colorbar(image, cax=bar, label="mean weight over input channels")
    what = (f"first {shown} of {out_ch} output channels" if shown < out_ch
            else f"all {out_ch} output channels")
    fig.suptitle(f"Kernels of {name} ({out_ch}x{in_ch}x{kh}x{kw})\naveraged over {in_ch} "
                 f"input channels; {what}", fontsize=10)
    return fig
