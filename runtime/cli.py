"""`runtime`: evaluate, inspect and verify packed files, with no packer or model code needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import __version__
from runtime.cli_common import (
    Parser,
    add_command,
    add_common_flags,
    existing_file,
    main as cli_main,
    print_json,
    progress_enabled,
)
from runtime.errors import DataError, printable

if TYPE_CHECKING:
    import torch

    from runtime.evaluate import EvalPlan
    from runtime.format.records import InputSpec
    from runtime.gating import MacCounter

# Heavy libraries (torch, onnx, onnxruntime) are imported inside the commands that use them,
# so --help, --version and argument errors answer at once (tools/bench/startup.py).

EPILOG = """examples:
  runtime eval r20.fb --cifar10 ../shared/data/cifar10
  runtime eval model.fb --imagenet /data/imagenet --batch-size 128 --json
  runtime eval r20.fb --cifar10 ../shared/data/cifar10 --backend onnx --int8
  runtime export r20.fb --onnx r20.onnx --compact
  runtime inspect r20.fb
  runtime verify r20.fb
"""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="runtime", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = add_command(
        sub, "eval", help="measure top-1/top-5 accuracy of a packed model",
        description="Load a packed file (no model code needed) and evaluate it on a labelled "
        "image folder, with the input transform stored in the file.",
        examples=[
            "runtime eval r20.fb --cifar10 ../shared/data/cifar10",
            "runtime eval r20.fb --cifar10 ../shared/data/cifar10 --limit 1000  # quicker",
            "runtime eval model.fb --imagenet /data/imagenet --batch-size 128 --json",
            "runtime eval model.fb --data my_images/ --device cuda  # <class>/<image> folders",
            "runtime eval r20.fb --cifar10 ../shared/data/cifar10 --backend onnx --int8",
        ])
    e.add_argument("file", type=Path, help="packed .fb file")
    data = e.add_mutually_exclusive_group(required=True)
    data.add_argument("--cifar10", type=Path, metavar="DIR",
                      help="CIFAR-10: a folder with test/<class>/ images, or cifar-10-batches-py")
    data.add_argument("--imagenet", type=Path, metavar="DIR",
                      help="ImageNet: a val/ folder of wnid subfolders (or DIR holding val/)")
    data.add_argument("--data", type=Path, metavar="DIR",
                      help="any <class>/<image> folder, classes in sorted order")
    e.add_argument("--limit", type=int, help="evaluate N images spread evenly over the set")
    e.add_argument("--batch-size", type=int, default=256, help="default 256")
    e.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: on the CPU one per 4 cores beyond "
                   "the first 4, at most 4, the model's threads taking the rest; with a GPU "
                   "up to 8)")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    e.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch module (default) or an onnxruntime session "
                   "(TensorRT > CUDA > CPU, as available)")
    e.add_argument("--int8", action="store_true",
                   help="8-bit weights and activations (QDQ graph / torch fake-quant), with "
                   "the activation scales stored in the file or measured with --calib-data")
    e.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="calibrate activation scales on these images now (for --int8)")
    e.add_argument("--calib-images", type=int, default=512, help="default 512")
    e.add_argument("--strict", action="store_true",
                   help="fail on an unreadable image instead of skipping and counting it")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_flags(e)
    e.set_defaults(func=_eval)

    i = add_command(
        sub, "inspect", help="print the size report of a packed file",
        description="Print a packed file's per-tensor table (scheme, coder, bytes, bits per "
        "weight, entropy bound), totals, section breakdown and class names. Sizes are bytes "
        "on disk; nothing is decoded.",
        examples=["runtime inspect r20.fb", "runtime inspect r20.fb --json  # for scripts"])
    i.add_argument("file", type=Path, help="packed .fb file")
    add_common_flags(i)
    i.set_defaults(func=_inspect)

    x = add_command(
        sub, "export", help="write a standalone ONNX model for any ONNX server",
        description="Export a packed file as an ONNX model (onnxruntime, Triton, TensorRT). "
        "--compact keeps codebooks and indices inside the ONNX file and rebuilds each weight "
        "with Gather when the session starts. --int8 writes the 8-bit graph in the form its "
        "server runs fastest (--target).",
        examples=["runtime export r20.fb --onnx r20.onnx",
                  "runtime export r20.fb --onnx r20.onnx --compact  # smaller on disk",
                  "runtime export m.fb --onnx m.onnx --int8  # for onnxruntime, the file's "
                  "scales",
                  "runtime export m.fb --onnx m.onnx --int8 --target tensorrt"])
    x.add_argument("file", type=Path, help="packed .fb file")
    x.add_argument("--onnx", type=Path, required=True, metavar="OUT", help="output .onnx file")
    x.add_argument("--compact", action="store_true",
                   help="store indices + codebooks, not fp32 weights (verified to fold)")
    x.add_argument("--int8", action="store_true",
                   help="QDQ graph with int8 weights and the file's activation scales")
    x.add_argument("--target", choices=["onnxruntime", "tensorrt"],
                   help="with --int8: the graph's form, for the server that runs it (default "
                   "onnxruntime: uint8 activations, ReLU as a table, fused by onnxruntime's "
                   "CPU kernels; tensorrt: int8 zero point 0, the Q/DQ placement TensorRT "
                   "wants)")
    add_common_flags(x)
    x.set_defaults(func=_export)

    v = add_command(
        sub, "verify", help="check every checksum and decode every tensor",
        description="Check a packed file whole: every blob's CRC-32, every tensor decoded, and "
        "the model built and loaded from them. Run it on files from elsewhere before serving "
        "them.",
        examples=["runtime verify r20.fb", "runtime verify r20.fb --json"])
    v.add_argument("file", type=Path, help="packed .fb file")
    add_common_flags(v)
    v.set_defaults(func=_verify)
    return parser


def _device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device


def _dataset(args: argparse.Namespace, spec: InputSpec, num_classes: int):
    from runtime.data import cifar10_dataset, image_folder_dataset, imagenet_dataset

    if args.cifar10 is not None:
        if num_classes and num_classes != 10:
            raise DataError(f"this model has {num_classes} classes; CIFAR-10 has 10")
        return cifar10_dataset(args.cifar10, "test", spec, args.strict)
    if args.imagenet is not None:
        if num_classes and num_classes != 1000:
            raise DataError(f"this model has {num_classes} classes; ImageNet-1k has 1000 "
                            "(is it a CIFAR model?)")
        return imagenet_dataset(args.imagenet, spec, args.strict)
    return image_folder_dataset(args.data, spec, args.strict)


def _start_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Under torchrun join the process group; one GPU per process."""
    import torch

    from runtime.distributed import init_distributed, local_rank

    if not init_distributed(cuda=device.type == "cuda"):
        return device, False
    return (torch.device("cuda", local_rank()) if device.type == "cuda" else device), True


def _act_scales(args: argparse.Namespace, spec: InputSpec, workers: int
                ) -> dict[str, float] | None:
    """Scales measured now with --calib-data, else None (use the file's own)."""
    if args.calib_data is None:
        return None
    from runtime import quant
    from runtime.data import calibration_dataset, make_loader
    from runtime.loader import load

    dataset = calibration_dataset(args.calib_data, spec)
    count = min(args.calib_images, len(dataset))
    return quant.calibrate(load(args.file), make_loader(dataset, 64, workers, count))


def _model_for_eval(args: argparse.Namespace, device: torch.device, spec: InputSpec,
                    plan: EvalPlan) -> tuple[Any, str]:
    """The model to evaluate, and which provider runs it."""
    from runtime import quant
    from runtime.loader import load
    from runtime.onnx import session

    if args.int8:
        if device.type != "cpu" and args.backend == "torch":
            raise DataError("--int8 with the torch backend simulates int8 on the CPU; "
                            "use --backend onnx (TensorRT or CUDA provider) for GPU int8")
        model = quant.int8_model(args.file, _act_scales(args, spec, plan.workers),
                                 backend=args.backend, device=device.type,
                                 threads=plan.threads)
        if isinstance(model, quant.OnnxSession):
            return model, model.provider
        return model, "cpu"
    if args.backend == "onnx":
        providers = ["CPUExecutionProvider"] if device.type == "cpu" else None
        sess = session(args.file, providers=providers, threads=plan.threads)
        return sess, sess.provider
    from runtime.evaluate import inference_model
    from runtime.gating import gates_of

    model = load(args.file, device=device)
    # A gated model (FBS) stays as loaded: fx's fusion would inline its gates, which then
    # could not report the channels each image kept (the MAC count).
    return (model if gates_of(model) else inference_model(model, device)), device.type


def _export(args: argparse.Namespace) -> int:
    from runtime.atomic import check_output

    existing_file(args.file)
    check_output(args.onnx, example="model.onnx")
    if args.int8:
        if args.compact:
            raise DataError("--int8 and --compact cannot be combined yet; pick one")
        from runtime.quant import export_int8

        report = export_int8(args.file, args.onnx, args.target)
    else:
        if args.target is not None:
            raise DataError("--target chooses the int8 graph's form; add --int8")
        from runtime.onnx import export_onnx

        report = export_onnx(args.file, args.onnx, compact=args.compact)
    if args.json:
        print_json(report)
    else:
        kind = (f"int8 QDQ for {report['target']}" if args.int8
                else "compact" if args.compact else "standalone")
        # Not "(7.21x)": beside a packed file that reads as its compression ratio, which is
        # fp32 over packed bytes (`runtime inspect`), not this.
        print(f"{args.onnx}: {report['onnx_bytes']:,} bytes ({kind} ONNX; "
              f"{report['onnx_to_packed']:.2f} times the packed file's "
              f"{report['packed_bytes']:,} bytes)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import contextlib

    if args.limit is not None and args.limit < 1:
        raise DataError("--limit must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise DataError("--workers must be at least 0")
    existing_file(args.file)
    import torch

    from runtime.data import make_loader
    from runtime.distributed import rank, world_size
    from runtime.evaluate import eval_plan, evaluate
    from runtime.format.reader import open_packed
    from runtime.gating import MacCounter
    from runtime.report import build_report

    device, distributed = _start_distributed(_device(args.device))
    plan = eval_plan(device.type, args.workers)
    try:
        with open_packed(args.file) as packed:
            report, spec = build_report(packed), packed.model.input
        dataset = _dataset(args, spec, report["num_classes"])
        with plan.applied():
            model, provider = _model_for_eval(args, device, spec, plan)
            loader = make_loader(dataset, args.batch_size, plan.workers, args.limit,
                                 distributed=distributed, pin_memory=device.type == "cuda")
            counting = (isinstance(model, torch.nn.Module) and args.backend == "torch"
                        and not args.int8)
            with MacCounter(model) if counting else contextlib.nullcontext() as counter:
                result = evaluate(model, loader, device if args.backend == "torch" else "cpu",
                                  progress=progress_enabled(args))
        macs = _macs(counter, distributed) if counting else {
            "macs_note": "MACs are counted on the fp32 torch backend only"}
        me, world = rank(), world_size()
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if me != 0:
        return 0
    out = {**result.as_dict(), "backend": args.backend, "provider": provider,
           "precision": "int8" if args.int8 else "fp32", "processes": world,
           "workers": plan.workers, "threads": plan.threads,
           "file": str(args.file),
           "file_bytes": report["file_bytes"], "ratio": report["ratio"], **macs}
    if args.json:
        print_json(out)
        return 0
    print(f"top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  on {out['images']:,} images "
          f"({out['images_per_s']:.0f} images/s, {out['skipped']} skipped)")
    print(f"file  {out['file_bytes']:,} bytes, ratio {out['ratio']:.2f}x vs fp32")
    if "macs_dense" in out and out.get("gated_layers"):
        print(f"MACs  {out['macs_executed'] / 1e6:,.2f}M executed per image of "
              f"{out['macs_dense'] / 1e6:,.2f}M dense ({out['macs_ratio']:.3f}x; "
              f"{out['gated_layers']} gated convolutions)")
    return 0


def _macs(counter: MacCounter, distributed: bool) -> dict[str, Any]:
    """The counter's summary; under torchrun, over every process's images."""
    import torch

    summary = counter.summary()
    if distributed:
        totals = torch.tensor([summary["macs_executed"] * summary["macs_images"],
                               summary["gate_other_ops"] * summary["macs_images"],
                               summary["macs_images"]], dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        images = max(int(totals[2]), 1)
        summary.update(macs_executed=round(float(totals[0]) / images, 1),
                       gate_other_ops=round(float(totals[1]) / images, 1), macs_images=images)
        summary["macs_ratio"] = round(summary["macs_executed"] / summary["macs_dense"], 6)
    return summary


def print_inspect(path: Path, as_json: bool, verify: bool = False) -> int:
    """`inspect` for both CLIs: the per-tensor table and totals, or the JSON report."""
    existing_file(path)
    from runtime.report import format_report, inspect_file

    report = inspect_file(path, verify)
    if as_json:
        print_json(report)
    else:
        print(format_report(report))
        print(_classes_line(report["class_names"]))
        if verify:
            print(f"verified    {report['verified_blobs']} blobs, all checksums match")
    return 0


def _classes_line(names: list[str], width: int = 100) -> str:
    """`classes     10: airplane, automobile, ...`, cut to one line; names from the file are
    escaped so that no control character reaches the terminal."""
    if not names:
        return "classes     none stored (pack with --class-names FILE or a data folder)"
    shown = ", ".join(printable(n) for n in names)
    line = f"classes     {len(names)}: {shown}"
    return line if len(line) <= width else line[:width - 4] + " ..."


def _inspect(args: argparse.Namespace) -> int:
    return print_inspect(args.file, args.json)


def _verify(args: argparse.Namespace) -> int:
    existing_file(args.file)
    from runtime.format.reader import open_packed
    from runtime.loader import load

    with open_packed(args.file) as packed:
        blobs = packed.verify()
    model = load(args.file)
    tensors = len(model.state_dict())
    if args.json:
        print_json({"file": str(args.file), "ok": True, "blobs": blobs, "tensors": tensors})
    else:
        print(f"{args.file}: ok ({blobs} blobs checksummed, {tensors} tensors decoded and "
              "loaded)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(_parser(), argv, "runtime")


if __name__ == "__main__":
    sys.exit(main())


