"""Weight distributions: per-layer histograms before and after, and the seed's scatter of
unique weight values against how often each occurs."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from packer.report.models import ModelView
from packer.report.style import AFTER, BEFORE, MARK, Margins, grid_figure, new_figure

HIST_COLUMNS = 3
HIST_ROWS = 4  # layers per page: HIST_COLUMNS * HIST_ROWS


def sample(t: torch.Tensor, limit: int, seed: int) -> np.ndarray:
    """At most `limit` values of `t` at seeded random positions (the same for equal shapes,
    so before and after are sampled at the same weights)."""
    flat = t.detach().reshape(-1).float()
    if flat.numel() > limit:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (limit,), generator=gen)]
    return flat.numpy()


def histogram_pages(after: ModelView, before: ModelView | None, samples: int, bins: int,
                    seed: int) -> Iterator[tuple[str, str, Figure]]:
    """(name, caption, figure) per page of HIST_COLUMNS x HIST_ROWS layers."""
    names = after.weight_names()
    per_page = HIST_COLUMNS * HIST_ROWS
    pages = math.ceil(len(names) / per_page)
    for page in range(pages):
        chunk = names[page * per_page:(page + 1) * per_page]
        first, last = page * per_page + 1, page * per_page + len(chunk)
        what = f"{before.label} vs {after.label}" if before else after.label
        fig = _histogram_page(chunk, after, before, samples, bins, seed)
        fig.suptitle(f"Weight histograms, layers {first}-{last} of {len(names)}: {what}")
        yield (f"weights_hist_{page + 1:02d}",
               f"Weight histograms of layers {first}-{last} of {len(names)}"
               + (" before (grey) and after (orange) compression" if before else "")
               + ". A layer stored as a few levels shows one stem per level, as tall as the "
               "number of weights on it; red ticks mark the levels.", fig)


HIST_MARGINS = Margins(left=0.85, right=0.5, top=0.85, bottom=0.95, wgap=0.85, hgap=0.8)


def _histogram_page(names: list[str], after: ModelView, before: ModelView | None, samples: int,
                    bins: int, seed: int) -> Figure:
    rows = math.ceil(len(names) / HIST_COLUMNS)
    fig, axes = grid_figure(rows, HIST_COLUMNS, 3.0, 1.55, HIST_MARGINS)
    handles = {}
    for ax, name in zip(axes.flat, names, strict=False):
        handles.update(_histogram(ax, name, after, before, samples, bins, seed))
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for column in range(min(HIST_COLUMNS, len(names))):
        last = column + HIST_COLUMNS * ((len(names) - 1 - column) // HIST_COLUMNS)
        axes.flat[last].set_xlabel("weight value")
    fig.supylabel(f"weights, in a sample of at most {samples:,} per layer", x=0.012)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncols=3,
               bbox_to_anchor=(0.5, 0.005))
    return fig


def _histogram(ax, name: str, after: ModelView, before: ModelView | None, samples: int,
               bins: int, seed: int) -> dict:
    """One layer: the smooth distribution as a histogram; a tensor stored as a few levels
    as one stem per level (how many weights took it, on the right-hand axis), since binning
    such a comb of spikes hides where the levels sit."""
    t = after.weights[name]
    values_after = sample(t, samples, seed)
    values_before = sample(before.weights[name], samples, seed) if before else None
    marks = after.marks.get(name)
    levels = marks.values if marks is not None else np.empty(0)
    span = [values_after.min(), values_after.max(), *levels[:1], *levels[-1:]]
    if values_before is not None:
        span += [values_before.min(), values_before.max()]
    low, high = float(min(span)), float(max(span))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    handles = {}
    if values_before is not None:
        counts, _ = np.histogram(values_before, edges)
        handles[f"before: {before.label}, weights per bin"] = ax.stairs(
            counts, edges, fill=True, color="0.72")
    if levels.size:
        # every sampled weight sits on a level: count them per (nearest) level
        at = np.searchsorted((levels[1:] + levels[:-1]) / 2, values_after)
        per_level = np.bincount(at, minlength=levels.size)
        stems = ax.twinx() if values_before is not None else ax
        stems.vlines(levels, 0, per_level, colors=AFTER, linewidth=1.2)
        (dots,) = stems.plot(levels, per_level, "o", color=AFTER, markersize=2.5)
        stems.set_ylim(0, per_level.max() * 1.1)
        where = " (right axis)" if values_before is not None else ""
        handles[f"after: {after.label}, weights per stored level{where}" if before
                else f"{after.label}, weights per stored level"] = dots
        if values_before is not None:
            stems.tick_params(axis="y", colors=AFTER)
        handles["stored codebook values"] = ax.vlines(
            levels, 0, 0.05, transform=ax.get_xaxis_transform(), colors=MARK, linewidth=1.5)
    else:
        counts, _ = np.histogram(values_after, edges)
        label = f"after: {after.label}, weights per bin" if before else (
            f"{after.label}, weights per bin")
        handles[label] = ax.stairs(counts, edges, color=AFTER if before else BEFORE,
                                   linewidth=1.1, fill=before is None)
    for axis in {ax.xaxis, ax.yaxis, stems.yaxis} if levels.size else (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(5))  # fewer tick labels: they are most of the cost
    shape = "x".join(map(str, t.shape))
    note = f" · {marks.note}" if marks is not None else ""
    ax.set_title(f"{name}\n{shape}{note}", loc="left")
    return handles


def unique_value_scatter(after: ModelView, before: ModelView | None,
                         max_points: int, seed: int) -> tuple[str, str, Figure]:
    """The seed's scatter: every distinct weight value (x) against how often it occurs (y),
    over all Conv and Linear weights; orange after compression, blue before."""
    fig = new_figure(11, 5)
    ax = fig.subplots()
    models = [(before, BEFORE), (after, AFTER)] if before else [(after, BEFORE)]
    for view, colour in models:
        values, counts = _unique_counts(view)
        shown = _thin(counts, max_points, seed)
        label = (f"{view.label}: {values.size:,} distinct values of {int(counts.sum()):,} "
                 f"weights")
        if shown.size < values.size:
            label += f" ({shown.size:,} drawn)"
        ax.scatter(values[shown], counts[shown], s=5, color=colour, alpha=0.6, linewidths=0,
                   label=label, rasterized=True)
    ax.set_yscale("log")
    # plain integers, not 6x10^0: with few decades the minor ticks carry the labels too
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.yaxis.set_major_formatter(plain)
    if ax.get_ylim()[1] < 100:
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("weight value")
    ax.set_ylabel("occurrences of the value (log scale)")
    ax.set_title("Distinct weight values and their frequency, all Conv and Linear weights"
                 + (" before and after compression" if before else ""))
    ax.legend(loc="upper right", markerscale=3)
    ax.grid(True, which="major", alpha=0.3)
    caption = ("Each point is one distinct weight value; its height is how many weights hold "
               "it. An uncompressed model has almost every value once; weight sharing "
               "collapses them onto a few shared values that occur thousands of times.")
    return "weights_unique", caption, fig


def _unique_counts(view: ModelView) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([view.weights[n].detach().reshape(-1).float().numpy()
                           for n in view.weight_names()])
    # numpy's vectorised sort makes this ~5x faster than torch.unique on CPU
    return np.unique(flat, return_counts=True)


def _thin(counts: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` points to draw: every frequent value, then a seeded random
    sample of the rest (millions of values that occur once draw as one band anyway)."""
    if counts.size <= limit:
        return np.arange(counts.size)
    keep_top = limit // 10
    order = np.argsort(counts, kind="stable")[::-1]
    top, rest = order[:keep_top], order[keep_top:]
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([top, rng.choice(rest, limit - keep_top, replace=False)]))
