"""Assemble a report: read the models, check the inputs, then make each figure in turn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from packer.report import activations, kernels, sizes, weights
from packer.report.html import render_html
from packer.report.models import ModelView, check_comparable, load_view, order_pair
from packer.report.output import INDEX, report_folder
from packer.report.style import styled
from runtime.errors import DataError

NEED_IMAGE = ("activation maps need an input image: pass --image IMG, or --data DIR to use "
              "its first test image (or --no-activations to leave them out)")


@dataclass(frozen=True)
class ReportOptions:
    """Caps that keep a large model's report quick and readable."""

    samples: int = 100_000  # weights sampled per histogram
    bins: int = 80  # histogram bins
    max_kernel_layers: int = 32  # convolutions with a kernel heatmap
    max_kernels: int = 64  # output channels drawn per convolution
    max_channels: int = 16  # channels drawn per ReLU output
    max_scatter_points: int = 50_000  # points per model in the unique-value scatter
    max_bars: int = 60  # bars per size plot (the smallest layers are summed beyond it)
    activations: bool = True
    dpi: int = 100
    seed: int = 0


@dataclass
class Entry:
    name: str  # file stem, unique within a report
    section: str  # a key of html.SECTIONS
    caption: str
    figure: Figure
    file: str = ""


class Report:
    """The models of one report and the figures they give, made lazily in page order.

    Everything that can be wrong with the input (files, architectures, the image) is
    checked in the constructor, before any figure is drawn.
    """

    def __init__(self, model: str | Path, compare: str | Path | None = None,
                 image: str | Path | None = None, data: str | Path | None = None,
                 arch: str | None = None, options: ReportOptions | None = None) -> None:
        self.options = options or ReportOptions()
        self.notes: list[str] = []
        # The image is read first: a bad one fails before minutes of model loading.
        picked = self._pick_image(image, data) if self.options.activations else None
        subject = load_view(model, arch)
        self.before: ModelView | None = None
        self.after = subject
        if compare is not None:
            other = load_view(compare, arch)
            check_comparable(subject, other)
            self.before, self.after = order_pair(subject, other)
        self._input = self._model_input(picked) if self.options.activations else None

    @property
    def views(self) -> list[ModelView]:
        return [v for v in (self.before, self.after) if v is not None]

    @staticmethod
    def _pick_image(image: str | Path | None, data: str | Path | None):
        classes: list[str] = []
        if data is not None:
            first, classes = activations.test_images(Path(data))
            image = image if image is not None else first
        if image is None:
            return None
        return Path(image), activations.open_image(Path(image)), classes

    def _model_input(self, picked):
        runnable = [v for v in self.views if v.module is not None]
        if not runnable:
            self.notes.append("No activation maps: the model is stored as an ONNX graph, "
                              "whose ReLUs torch cannot see.")
            return None
        if picked is None:
            raise DataError(NEED_IMAGE)
        path, img, classes = picked
        x, pixels = activations.model_input(img, self.after.input_spec or
                                            runnable[-1].input_spec)
        return path, x, pixels, runnable, classes

    def entries(self) -> Iterator[Entry]:
        """Every figure, each under a unique name (two packed files may share a file name)."""
        seen: set[str] = set()
        for entry in self._entries():
            base, n = entry.name, 1
            while entry.name in seen:
                n += 1
                entry.name = f"{base}_{n}"
            seen.add(entry.name)
            yield entry

    def _entries(self) -> Iterator[Entry]:
        o = self.options
        with styled():
            yield from self._sizes()
            for name, caption, fig in weights.histogram_pages(self.after, self.before,
                                                              o.samples, o.bins, o.seed):
                yield Entry(name, "weights", caption, fig)
            yield Entry(*_section("weights", weights.unique_value_scatter(
                self.after, self.before, o.max_scatter_points, o.seed)))
            convs = kernels.spatial_convs(self.after)
            if len(convs) > o.max_kernel_layers:
                self.notes.append(f"Kernel heatmaps of the first {o.max_kernel_layers} of "
                                  f"{len(convs)} spatial convolutions.")
            for item in kernels.kernel_figures(self.after, self.before, o.max_kernel_layers,
                                               o.max_kernels):
                yield Entry(*_section("kernels", item))
            yield from self._activations()

    def _sizes(self) -> Iterator[Entry]:
        packed = [v for v in self.views if v.kind == "packed"]
        if not packed:
            self.notes.append("No size plots: they read a packed file's index; give a .fb file "
                              "(with --compare for the original model).")
        for view in packed:
            for item in sizes.size_figures(view.path, self.options.max_bars):
                yield Entry(*_section("sizes", item))

    def _activations(self) -> Iterator[Entry]:
        if self._input is None:
            return
        path, x, pixels, runnable, classes = self._input
        captured = [activations.capture_relus(v.module, x) for v in runnable]
        predictions = [(v.label, activations.prediction(logits, v.class_names or classes))
                       for v, (_, logits) in zip(runnable, captured, strict=True)]
        yield Entry(*_section("activations", activations.input_figure(path, pixels,
                                                                      predictions)))
        relus = [relu for relu, _ in captured]
        if not relus[-1]:
            self.notes.append("No activation maps: the model calls no ReLU.")
            return
        for item in activations.activation_pages(runnable, relus, self.options.max_channels):
            yield Entry(*_section("activations", item))

    def model_rows(self) -> list[dict[str, Any]]:
        rows = []
        for view in self.views:
            role = ("model" if self.before is None
                    else "before" if view is self.before else "after")
            params = sum(t.numel() for t in view.weights.values() if t.is_floating_point())
            size = view.path.stat().st_size
            rows.append({"role": role, "file": view.path.name, "kind": view.kind,
                         "architecture": view.arch, "method": view.method or "-",
                         "parameters": params, "bytes on disk": size,
                         "vs fp32": f"{view.fp32_bytes / size:.2f}x smaller" if view.fp32_bytes
                         else "-"})
        return rows


def _section(section: str, item: tuple[str, str, Figure]) -> tuple[str, str, str, Figure]:
    name, caption, fig = item
    return name, section, caption, fig


def figures(model: str | Path, compare: str | Path | None = None,
            image: str | Path | None = None, data: str | Path | None = None,
            arch: str | None = None, options: ReportOptions | None = None) -> dict[str, Figure]:
    """Every figure of the report as matplotlib Figures, by name (for notebooks).

    `model` is a checkpoint or packed file; `compare` the same model before or after
    compression; `image` (or `data`, a folder whose first test image is used) feeds the
    activation maps, which `ReportOptions(activations=False)` leaves out.
    """
    return {e.name: e.figure for e in Report(model, compare, image, data, arch,
                                             options).entries()}


def write_report(out: str | Path, model: str | Path, compare: str | Path | None = None,
                 image: str | Path | None = None, data: str | Path | None = None,
                 arch: str | None = None, options: ReportOptions | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Write every figure as PNG and an index.html into the folder `out`, atomically."""
    started = time.perf_counter()
    out = Path(out)
    with report_folder(out) as tmp:
        report = Report(model, compare, image, data, arch, options)
        written: list[Entry] = []
        for entry in tqdm(report.entries(), desc="report", unit="figure", disable=not progress):
            entry.file = f"{entry.name}.png"
            entry.figure.savefig(tmp / entry.file, dpi=report.options.dpi)
            entry.figure = None  # drawn and saved: let it go
            written.append(entry)
        title = "weightpack report: " + " vs ".join(v.label for v in report.views)
        html = render_html(title, report.model_rows(), written, report.notes)
        (tmp / INDEX).write_text(html, encoding="utf-8")
    return {"out": str(out), "index": str(out / INDEX), "figures": [e.file for e in written],
            "notes": report.notes, "seconds": round(time.perf_counter() - started, 3)}
