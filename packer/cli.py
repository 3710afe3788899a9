"""`packer`: compress a PyTorch checkpoint into a packed .fb file, and inspect packed files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packer.compress import PackRequest, pack
from packer.encode import CODER_CHOICES
from packer.methods import METHODS
from packer.ptq import flags as ptq_flags
from packer.ptq.budget import format_budget
from packer.ptq.calib import format_cost
from packer.training import DataSpec, launch_rank
from runtime import cli as runtime_cli, zoo
from runtime.cli_common import add_common_flags, print_json, progress_enabled, run
from runtime.format.preamble import DEFAULT_ALIGNMENT, MAX_ALIGNMENT
from runtime.report import format_report

EPILOG = """examples:
  packer compress --method kmeans resnet20.pth -o r20.fb
  packer compress --method uniform --set bits=4 --set conv1.method=none model.pth -o m.fb
  packer compress --method uniform --target-ratio 10.9 --calib-data DATA model.pth -o m.fb
  packer inspect r20.fb --json
  packer methods            (every method and its options)
"""


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
    parser = argparse.ArgumentParser(
        prog="packer", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a checkpoint into a packed file",
                       description="Compress a checkpoint (state_dict, safetensors or "
                       "TorchScript) into one self-contained packed file, then print its true "
                       "size on disk, compression ratio and a per-tensor table.")
    c.add_argument("model", type=Path, help="input checkpoint (.pth/.pt/.th/.safetensors)")
    c.add_argument("-o", "--output", type=Path,
                   help="output .fb file (default: MODEL_STEM.METHOD.fb here)")
    c.add_argument("--method", default="kmeans", choices=sorted(METHODS),
                   help="compression method (default: kmeans); see `packer methods`")
    c.add_argument("--config", type=Path, help="JSON or YAML file of method options")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable; GLOB.KEY=VALUE for matching layers only "
                   "(e.g. k=16, conv1.method=none, layer3.*.bits=4)")
    c.add_argument("--fp16", action="store_true",
                   help="store tensors kept raw at float16 (same as --set fp16=true)")
    c.add_argument("--arch", help="architecture name (default: inferred from the checkpoint; "
                   "see `packer archs`)")
    c.add_argument("--coder", default="auto", choices=CODER_CHOICES,
                   help="entropy coder for every stream (default: auto, the smallest per "
                   "stream)")
    c.add_argument("--alignment", type=_alignment, default=DEFAULT_ALIGNMENT, metavar="BYTES",
                   help=f"data blob alignment, a power of two from 8 (default "
                   f"{DEFAULT_ALIGNMENT}: cache lines for memory-mapped tensors; 8 saves about "
                   f"30 bytes of padding per tensor, which matters for small models)")
    c.add_argument("--mean", type=_floats, help="input normalisation mean, e.g. 0.5,0.5,0.5")
    c.add_argument("--std", type=_floats, help="input normalisation std")
    c.add_argument("--input-size", type=_ints, help="input shape C,H,W, e.g. 3,32,32")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole pickled model (runs code from the file: "
                   "only for files you trust)")
    c.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="calibration images (a CIFAR/ImageNet root, whose train/ split is "
                   "used, or any <class>/<image> folder): 8-bit activation scales stored for "
                   "`runtime eval --int8`, BatchNorm re-estimation and bias correction after "
                   "post-training methods, sensitivity for size budgets, AdaRound")
    c.add_argument("--calib-images", type=int, default=512, help="images to calibrate on, "
                   "drawn with --seed (default 512)")
    c.add_argument("--calib-method", default="percentile", choices=["minmax", "percentile", "mse"],
                   help="activation range rule (default percentile 99.99)")
    data = c.add_mutually_exclusive_group()
    data.add_argument("--cifar10", type=Path, metavar="DIR",
                      help="training data for methods that fine-tune (train/<class>/ images)")
    data.add_argument("--imagenet", type=Path, metavar="DIR", help="ImageNet root (train/, val/)")
    data.add_argument("--data", type=Path, metavar="DIR", help="any image folder with train/, val/")
    c.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    c.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--quiet", action="store_true", help="print totals only, no tensor table")
    ptq_flags.add_flags(c)
    add_common_flags(c)
    c.set_defaults(func=_compress)

    i = sub.add_parser("inspect", help="print the size report of a packed file",
                       description="Print a packed file's per-tensor table, totals and "
                       "section breakdown (sizes are bytes on disk).")
    i.add_argument("file", type=Path, help="packed .fb file")
    i.add_argument("--verify", action="store_true", help="also check every blob checksum")
    add_common_flags(i)
    i.set_defaults(func=_inspect)

    m = sub.add_parser("methods", help="list compression methods and their options")
    add_common_flags(m)
    m.set_defaults(func=_methods)

    a = sub.add_parser("archs", help="list the architectures a packed file can name")
    add_common_flags(a)
    a.set_defaults(func=_archs)
    return parser


def _alignment(text: str) -> int:
    value = int(text)
    if value < 8 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise argparse.ArgumentTypeError(f"must be a power of two from 8 to {MAX_ALIGNMENT}")
    return value


def _compress(args: argparse.Namespace) -> int:
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
        data=data, alignment=args.alignment, **ptq_flags.request_fields(args)))
    if launch_rank() != 0:
        return 0  # under torchrun rank 0 reports; the file is its alone
    if args.json:
        print_json(report)
    else:
        print(format_report(report, tensors=not args.quiet))
        if "budget" in report:
            print(format_budget(report["budget"], report["budget"]["option"]))
        if "calibration" in report:
            print(format_cost(report["calibration"]))
        if "reference_bits" in report:
            print(f"reference   {report['reference_bits']:,} bits = "
                  f"{report['reference_mib']:.3f} MiB by the PQF paper's size rule")
        print(f"packed in {report['pack_seconds']:.2f} s -> {output}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    return runtime_cli.print_inspect(args.file, args.json, args.verify)


def _methods(args: argparse.Namespace) -> int:
    doc = {name: {"summary": m.summary,
                  "options": {k: {"default": o.default, "help": o.help} for k, o in
                              m.options.items()}}
           for name, m in METHODS.items()}
    if args.json:
        print_json(doc)
        return 0
    for name, info in doc.items():
        print(f"{name}: {info['summary']}")
        for key, opt in info["options"].items():
            print(f"    {key:<16} default {opt['default']!s:<8} {opt['help']}")
    print("every method: GLOB.method=none keeps matching layers uncompressed; fp16=true "
          "stores raw tensors at float16")
    return 0


def _archs(args: argparse.Namespace) -> int:
    names = zoo.names()
    if args.json:
        print_json(names)
    else:
        print("\n".join(names))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(args.func, args, "packer")


if __name__ == "__main__":
    sys.exit(main())
