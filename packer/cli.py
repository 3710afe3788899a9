"""`packer`: compress a PyTorch checkpoint into a packed .fb file, and inspect packed files."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

from packer import __version__
from packer.methods import METHODS
from packer.report.cli import add_parser as add_report_parser
from runtime.cli_common import (
    Parser,
    add_command,
    add_common_flags,
    existing_file,
    main as cli_main,
    print_json,
    progress_enabled,
)
from runtime.format.preamble import DEFAULT_ALIGNMENT, MAX_ALIGNMENT

# torch and the packer's machinery are imported inside the commands that use them, so --help,
# --version and argument errors answer at once (tools/bench/startup.py).

EPILOG = """examples:
  packer compress --method kmeans resnet20.pth -o r20.fb
  packer compress --method uniform --set bits=4 --set conv1.method=none model.pth -o m.fb
  packer compress --method pqf model.pth --cifar10 ../shared/data/cifar10 -o m.fb
  packer inspect r20.fb --json
  packer methods            (every method and its options)
  packer archs              (every architecture, with its short name)
"""


def _coder(text: str) -> str:
    """A --coder value. Checked here, not by argparse `choices`: argparse reads a choices list
    to format any help text, and the coder names are imported with numpy."""
    if text == "auto":
        return text
    from packer.config import CODER_CHOICES

    if text not in CODER_CHOICES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(CODER_CHOICES)})")
    return text


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 0.5,0.5,0.5, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 3,32,32, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="packer", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"packer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = add_command(
        sub, "compress", help="compress a checkpoint into a packed file",
        description="Compress a checkpoint (state_dict, safetensors or TorchScript) into one "
        "self-contained packed file, then print its true size on disk, compression ratio and "
        "a per-tensor table. The output path is checked before any work starts.",
        examples=[
            "packer compress --method kmeans resnet20.pth -o r20.fb",
            "packer compress --method int8 model.pth -o m.fb --calib-data ../shared/data/cifar10",
            "packer compress --method uniform --set bits=4 --set conv1.method=none model.pth "
            "-o m.fb",
            "packer compress --method kmeans --set 'layer3.*.k=16' --fp16 model.pth -o m.fb",
            "packer compress --method pqf model.pth --cifar10 ../shared/data/cifar10 -o m.fb",
            "packer compress --method pqf --set finetune_epochs=0 model.pth -o m.fb  "
            "# no data: far less accurate",
            "packer compress --method wfn --set fixing_epochs=0 model.pth -o m.fb  "
            "# post-training WFN",
            "packer compress --arch resnet18 --class-names classes.txt model.safetensors "
            "-o m.fb",
            "packer compress --method int8 traced.pt -o m.fb  # TorchScript: its own graph",
        ])
    c.add_argument("model", type=Path, help="input checkpoint (.pth/.pt/.th/.safetensors)")
    c.add_argument("-o", "--output", type=Path,
                   help="output .fb file (default: MODEL_STEM.METHOD.fb here)")
    c.add_argument("--method", default="kmeans", metavar="METHOD",
                   help="compression method (default: kmeans): " + ", ".join(sorted(METHODS))
                   + "; or a chain such as prune+kmeans+int8; see `packer methods`")
    c.add_argument("--config", type=Path, help="JSON or YAML file of method options")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable; GLOB.KEY=VALUE for matching layers only "
                   "(e.g. k=16, conv1.method=none, layer3.*.bits=4)")
    c.add_argument("--fp16", action="store_true",
                   help="store tensors kept raw at float16 (same as --set fp16=true)")
    c.add_argument("--arch", help="architecture (default: inferred from the checkpoint): a "
                   "name from `packer archs` or its library's own short name, e.g. resnet18, "
                   "resnet20; `graph` stores a TorchScript model's own graph")
    c.add_argument("--coder", default="auto", type=_coder, metavar="CODER",
                   help="entropy coder for every stream: auto, raw, zstd, huffman or ans "
                   "(default: auto, the smallest per "
                   "stream, raw/zstd unless huffman/ans is over 1%% smaller: they decode "
                   "5-50x slower)")
    c.add_argument("--alignment", type=_alignment, default=DEFAULT_ALIGNMENT, metavar="BYTES",
                   help=f"data blob alignment, a power of two from 8 (default "
                   f"{DEFAULT_ALIGNMENT}: cache lines for memory-mapped tensors; 8 saves about "
                   f"30 bytes of padding per tensor, which matters for small models)")
    c.add_argument("--mean", type=_floats, help="input normalisation mean, e.g. 0.5,0.5,0.5")
    c.add_argument("--std", type=_floats, help="input normalisation std")
    c.add_argument("--input-size", type=_ints, help="input shape C,H,W, e.g. 3,32,32 (default: "
                   "the architecture's, or what torch.jit.trace recorded)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole pickled model (runs code from the file: "
                   "only for files you trust)")
    c.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="calibrate 8-bit activation scales on these images (a CIFAR/ImageNet "
                   "root, whose train/ split is used, or any <class>/<image> folder) and store "
                   "them in the file for `runtime eval --int8`")
    c.add_argument("--calib-images", type=int, default=512, help="images to calibrate on "
                   "(default 512)")
    c.add_argument("--calib-method", default="percentile", choices=["minmax", "percentile", "mse"],
                   help="activation range rule (default percentile 99.99)")
    c.add_argument("--class-names", type=Path, metavar="FILE",
                   help="the model's class names, one per line in output order, stored in the "
                   "file for services (default: the class folders of --cifar10/--imagenet/"
                   "--data, else of --calib-data)")
    data = c.add_mutually_exclusive_group()
    data.add_argument("--cifar10", type=Path, metavar="DIR",
                      help="training data for methods that train (pqf, wfn, pwfn): "
                      "train/<class>/ images; for any method, the class names")
    data.add_argument("--imagenet", type=Path, metavar="DIR", help="ImageNet root (train/, val/)")
    data.add_argument("--data", type=Path, metavar="DIR", help="any image folder with train/, val/")
    c.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    c.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--quiet", action="store_true", help="print totals only, no tensor table")
    add_common_flags(c)
    c.set_defaults(func=_compress)

    i = add_command(
        sub, "inspect", help="print the size report of a packed file",
        description="Print a packed file's per-tensor table, totals and section breakdown "
        "(sizes are bytes on disk), and its class names.",
        examples=["packer inspect r20.fb", "packer inspect r20.fb --verify",
                  "packer inspect r20.fb --json  # for scripts"])
    i.add_argument("file", type=Path, help="packed .fb file")
    i.add_argument("--verify", action="store_true", help="also check every blob checksum")
    add_common_flags(i)
    i.set_defaults(func=_inspect)

    m = add_command(
        sub, "methods", help="list compression methods and their options",
        description="List every compression method with its options, their defaults and what "
        "they do. Set an option with --set KEY=VALUE, or GLOB.KEY=VALUE for matching layers.",
        examples=["packer methods", "packer methods --json"])
    add_common_flags(m)
    m.set_defaults(func=_methods)

    a = add_command(
        sub, "archs", help="list the architectures a packed file can name",
        description="List the allow-listed architectures a packed file can name, each with "
        "the short name its library gives it; --arch takes either.",
        examples=["packer archs", "packer archs --json"])
    add_common_flags(a)
    a.set_defaults(func=_archs)
    add_report_parser(sub)
    return parser


def _alignment(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 8 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise argparse.ArgumentTypeError(f"expected a power of two from 8 to {MAX_ALIGNMENT}, "
                                         f"got {text!r}")
    return value


def _compress(args: argparse.Namespace) -> int:
    existing_file(args.model)
    from packer.compress import PackRequest, pack
    from packer.training import DataSpec
    from runtime.distributed import launch_rank
    from runtime.report import format_report

    output = args.output or Path(f"{args.model.stem}.{args.method}.fb")
    data = None
    for kind, root in (("cifar10", args.cifar10), ("imagenet", args.imagenet),
                       ("folder", args.data)):
        if root is not None:
            data = DataSpec(kind, root, batch_size=args.batch_size, workers=args.workers)
    overrides = list(args.overrides) + (["fp16=true"] if args.fp16 else [])
    report = pack(PackRequest(
        source=args.model, output=output, method=args.method, config_file=args.config,
        overrides=overrides, arch=args.arch, coder=args.coder, mean=args.mean, std=args.std,
        input_size=args.input_size, trust_pickle=args.trust_pickle, seed=args.seed,
        progress=progress_enabled(args), calib_data=args.calib_data,
        calib_images=args.calib_images, calib_method=args.calib_method, workers=args.workers,
        data=data, alignment=args.alignment, class_names_file=args.class_names))
    if launch_rank() != 0:
        return 0  # under torchrun rank 0 reports; the file is its alone
    if args.json:
        print_json(report)
    else:
        print(format_report(report, tensors=not args.quiet))
        if "reference_bits" in report:
            print(f"reference   {report['reference_bits']:,} bits = "
                  f"{report['reference_mib']:.3f} MiB by the PQF paper's size rule")
        print(f"packed in {report['pack_seconds']:.2f} s -> {output}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from runtime.cli import print_inspect

    return print_inspect(args.file, args.json, args.verify)


def _methods(args: argparse.Namespace) -> int:
    from packer.methods.chain import RANK_NAMES

    doc = {name: {"summary": m.summary,
                  "options": {k: {"default": o.default, "help": o.help} for k, o in
                              m.options.items()}}
           for name, m in METHODS.items()}
    if args.json:
        print_json(doc)
        return 0
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 120)
    key_width = max(len(k) for info in doc.values() for k in info["options"])
    indent = " " * (4 + key_width + 2)
    for name, info in doc.items():
        print(textwrap.fill(f"{name}: {info['summary']}", width, subsequent_indent="    "))
        for key, opt in info["options"].items():
            text = f"{opt['help']} (default {_typed(opt['default'])})"
            print(textwrap.fill(text, width, initial_indent=f"    {key:<{key_width}}  ",
                                subsequent_indent=indent, break_on_hyphens=False))
    print(textwrap.fill("every method: GLOB.method=none keeps matching layers uncompressed; "
                        "fp16=true stores raw tensors at float16", width))
    print(textwrap.fill("chains: --method a+b runs a, then b on what a left (order: "
                        + " -> ".join(RANK_NAMES.values()) + "); KEY=VALUE reaches every stage "
                        "with that option, STAGE:KEY=VALUE one stage", width))
    return 0


def _typed(value: object) -> str:
    """A default as it would be typed after --set: true, 0.5, [0.4, 0.6], unset."""
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def _archs(args: argparse.Namespace) -> int:
    from runtime import zoo

    short = zoo.short_names()
    if args.json:
        print_json([{"name": full, "short": name} for full, name in short.items()])
        return 0
    width = max(map(len, short)) + 2
    print(f"{'name (stored in the file)':<{width}} short name (--arch takes either)")
    for full, name in short.items():
        print(f"{full:<{width}} {name}")
    if importlib.util.find_spec("timm") is not None:
        print("  and timm's models: --arch timm.NAME, or NAME where torchvision has no NAME "
              "or the checkpoint fits only timm's (e.g. deit_tiny_patch16_224)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(_parser(), argv, "packer")


if __name__ == "__main__":
    sys.exit(main())
