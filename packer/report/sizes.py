"""Where the bytes of a packed file went, from the file alone (its index, through the runtime's
reader): coded bytes per layer split into indices / codebook / raw, bits per weight against
the order-0 entropy bound, and the file's sections."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from packer.report.style import PARTS, new_figure
from runtime.format.reader import open_packed
from runtime.report import build_report, tensor_row

THOUSANDS = FuncFormatter(lambda v, _: f"{v:,.0f}")


@dataclass
class LayerBytes:
    """Coded bytes of one layer (a module: all tensors sharing a name prefix)."""

    name: str
    indices: int = 0  # index streams with their code tables
    codebook: int = 0  # codebooks, scales and zero points
    raw: int = 0  # values stored as they are (entropy-coded bytes), with their code tables
    numel: int = 0
    bound: float = 0.0  # order-0 entropy bound of the streams + the arrays, in bytes

    @property
    def total(self) -> int:
        return self.indices + self.codebook + self.raw


def layer_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def read_sizes(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[LayerBytes]]:
    """(the file's size report, its per-tensor rows, per-layer bytes), from the index alone."""
    with open_packed(path) as packed:
        report = build_report(packed)
        rows, layers = [], {}
        for t in packed.model.tensors:
            row = tensor_row(t)
            row["index_bytes"] = sum(s.blob.length + s.params_nbytes()
                                     for role, s in t.streams() if role == "indices")
            rows.append(row)
            layer = layers.setdefault(layer_of(t.name), LayerBytes(layer_of(t.name)))
            layer.indices += row["index_bytes"]
            layer.codebook += row["array_bytes"]
            layer.raw += row["stream_bytes"] - row["index_bytes"]
            layer.numel += row["numel"]
            layer.bound += row["bound_bytes"]
    return report, rows, list(layers.values())


def _capped(layers: list[LayerBytes], max_bars: int) -> list[LayerBytes]:
    """Network order; beyond `max_bars` the smallest layers are summed into one last bar."""
    if len(layers) <= max_bars:
        return layers
    keep = {id(x) for x in sorted(layers, key=lambda x: x.total, reverse=True)[:max_bars - 1]}
    rest = [x for x in layers if id(x) not in keep]
    other = LayerBytes(f"{len(rest)} smaller layers")
    for x in rest:
        other.indices += x.indices
        other.codebook += x.codebook
        other.raw += x.raw
        other.numel += x.numel
        other.bound += x.bound
    return [x for x in layers if id(x) in keep] + [other]


def size_figures(path: Path, max_bars: int) -> Iterator[tuple[str, str, Figure]]:
    report, rows, layers = read_sizes(path)
    stem = _slug(path.name)
    yield (f"sizes_layers_{stem}", f"Coded bytes per layer of {path.name}, split into "
           "indices, codebooks (with scales) and raw values; bits per weight at each bar's end.",
           _layers_figure(path, report, _capped(layers, max_bars)))
    weights = [r for r in rows if len(r["shape"]) >= 2 and r["dtype"].startswith("float")]
    if weights:
        yield (f"sizes_bits_{stem}", f"Bits per weight of each Conv/Linear weight of "
               f"{path.name} as stored, against the order-0 entropy bound of its streams.",
               _bits_figure(path, report, weights[:max_bars], len(weights)))
    yield (f"sizes_sections_{stem}", f"Every byte of {path.name} on disk, by section.",
           _sections_figure(path, report))


def _layers_figure(path: Path, report: dict[str, Any], layers: list[LayerBytes]) -> Figure:
    fig = new_figure(11, 1.6 + 0.19 * len(layers))
    ax = fig.subplots()
    y = np.arange(len(layers))
    left = np.zeros(len(layers))
    for part, colour in PARTS.items():
        widths = np.array([getattr(x, part) for x in layers], dtype=float)
        ax.barh(y, widths, left=left, color=colour, label=part, height=0.75)
        left += widths
    for i, x in enumerate(layers):
        bits = 8 * x.total / x.numel if x.numel else 0.0
        ax.annotate(f" {x.total:,} B, {bits:.2f} b/w", (left[i], i), va="center", fontsize=7)
    ax.set_yticks(y, [x.name for x in layers], fontsize=7)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlim(0, left.max() * 1.28 if left.size and left.max() else 1)
    ax.set_xlabel("coded bytes of the layer, as `packer inspect` counts them (code tables "
                  "uncompressed); b/w: bits per weight")
    ax.xaxis.set_major_formatter(THOUSANDS)
    ax.set_ylabel("layer (network order)")
    ax.legend(loc="lower right")
    ax.set_title(f"Where the bytes went: {path.name}, {report['file_bytes']:,} bytes on disk, "
                 f"{report['ratio']:.2f}x smaller than fp32 (method {report['method']})",
                 loc="left")
    return fig


def _bits_figure(path: Path, report: dict[str, Any], rows: list[dict[str, Any]],
                 total: int) -> Figure:
    fig = new_figure(11, 1.9 + 0.19 * len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))
    bits = np.array([8 * r["coded_bytes"] / r["numel"] for r in rows])
    bound = np.array([8 * r["bound_bytes"] / r["numel"] for r in rows])
    ax.barh(y, bits, color=PARTS["indices"], height=0.75, label="stored bits per weight")
    ax.scatter(bound, y, marker="|", s=120, color="black", linewidths=2, zorder=3,
               label="order-0 entropy bound")
    for i, r in enumerate(rows):
        ax.annotate(f" {bits[i]:.2f} ({r['levels']}, {r['coder']})",
                    (max(bits[i], bound[i]), i), va="center", fontsize=7)
    ax.axvline(report["bits_per_weight"], color="0.4", linestyle="--", linewidth=1,
               label=f"whole model: {report['bits_per_weight']:.3f} bits per compressed weight")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, max(bits.max(), bound.max()) * 1.3)
    ax.set_xlabel("bits per weight (coded bytes x 8 / weights, codebooks and tables included)")
    ax.set_ylabel("weight tensor")
    fig.legend(loc="outside lower center", ncols=3)
    shown = f"the first {len(rows)} of {total} weight tensors" if len(rows) < total else (
        f"all {total} weight tensors")
    ax.set_title(f"Bits per weight of {path.name} against the entropy bound ({shown})",
                 loc="left")
    return fig


def _sections_figure(path: Path, report: dict[str, Any]) -> Figure:
    fig = new_figure(11, 2.4)
    ax = fig.subplots()
    left = 0
    colours = {"indices": PARTS["indices"], "codebooks": PARTS["codebook"],
               "raw_tensors": PARTS["raw"]}
    extra = iter(["#59a14f", "#b07aa1", "#edc948", "#76b7b2"])
    for section, nbytes in report["sections"].items():
        colour = colours.get(section) or next(extra)
        ax.barh(0, nbytes, left=left, color=colour, height=0.6,
                label=f"{section.replace('_', ' ')}: {nbytes:,} B")
        left += nbytes
    ax.set_yticks([])
    ax.set_xlim(0, report["file_bytes"])
    ax.xaxis.set_major_formatter(THOUSANDS)
    ax.set_xlabel("bytes on disk")
    fig.legend(loc="outside lower center", ncols=4)
    ax.set_title(f"{path.name}: {report['file_bytes']:,} bytes on disk by section "
                 f"(fp32 {report['fp32_bytes']:,} B, {report['ratio']:.2f}x)", loc="left")
    return fig


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
