"""Pictures of a model and its packed file: weight histograms, the unique-value scatter, kernel
heatmaps, ReLU activations, and where the bytes went; `packer report` writes them as PNGs with
an index.html.

    from packer.report import figures
    figs = figures("r20.fb", compare="resnet20.pth", image="cat.jpg")   # name -> Figure

matplotlib is an optional dependency (`pip install "weightpack[report]"`): this package
imports it only when a figure is asked for, so the rest of `packer` works without it.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import WeightpackError

__all__ = ["Report", "ReportOptions", "figures", "write_report"]

MISSING = ("packer report needs matplotlib, which is not installed: "
           "pip install 'weightpack[report]'")


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise WeightpackError(MISSING) from None
    from packer.report import build

    return getattr(build, name)
