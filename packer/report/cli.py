"""`packer report`: the subcommand's flags and handler (matplotlib is imported only to run it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.cli_common import add_common_flags, existing_file, print_json, progress_enabled

DESCRIPTION = """\
Draw a model and its packed file: per-layer weight histograms (before and after, codebook
values marked), distinct weight values against their frequency, kernel heatmaps of every
spatial convolution, activation maps after each ReLU for one image, and where the bytes of a
packed file went (per layer: indices / codebooks / raw, bits per weight, entropy bound).
Writes PNGs and index.html into the --out folder, whole or not at all. A packed file
alone gives every plot of the compressed model; --compare adds the original (or another
packing)."""

EPILOG = """examples:
  packer report r20.fb --compare resnet20.pth --data ../shared/data/cifar10 --out r20-report
  packer report r20.fb --image cat.png --out r20-report
  packer report r20.fb --no-activations --out sizes-only"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parser(sub: Any) -> None:
    """Register `report` on the packer's subcommand parser."""
    r = sub.add_parser("report", help="draw weights, kernels, activations and sizes as PNGs "
                       "and an HTML page", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", type=Path, metavar="MODEL_OR_PACKED",
                   help="a checkpoint (.pth/.pt/.th/.safetensors) or a packed .fb file")
    r.add_argument("--compare", type=Path, metavar="OTHER",
                   help="the same model before (or after) compression, to draw side by side")
    r.add_argument("--image", type=Path, metavar="IMG", help="input image for activation maps")
    r.add_argument("--data", type=Path, metavar="DIR", help="image folder whose first test "
                   "image (test/ or val/ first) is used when --image is not given")
    r.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="report folder (created; an earlier report there is replaced)")
    r.add_argument("--arch", help="architecture of a checkpoint (default: inferred)")
    r.add_argument("--no-activations", action="store_true", help="leave out activation maps")
    r.add_argument("--samples", type=_positive, default=100_000, metavar="N",
                   help="weights sampled per histogram (default 100000)")
    r.add_argument("--max-kernels", type=_positive, default=64, metavar="N",
                   help="output channels drawn per convolution (default 64)")
    r.add_argument("--max-layers", type=_positive, default=32, metavar="N",
                   help="convolutions with a kernel heatmap (default 32)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_flags(r)
    r.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    existing_file(args.model)  # at once, before the imports below
    from packer.report import ReportOptions, write_report

    options = ReportOptions(samples=args.samples, max_kernels=args.max_kernels,
                            max_kernel_layers=args.max_layers,
                            activations=not args.no_activations)
    summary = write_report(args.out, args.model, compare=args.compare, image=args.image,
                           data=args.data, arch=args.arch, options=options,
                           progress=progress_enabled(args))
    if args.json:
        print_json(summary)
        return 0
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {len(summary['figures'])} figures and index.html to {summary['out']} in "
          f"{summary['seconds']:.1f} s")
    return 0
