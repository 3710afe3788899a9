"""PQF size/accuracy curve on the shared ResNet-20, and k-means/permutation timing on ResNet-18.

    python tools/bench/pqf.py curve --ks 16 32 64 128 256 --val-limit 2000 -o pqf_curve.json
    python tools/bench/pqf.py finetune --k 64 --epochs 2 --train-limit 10000 -o pqf_ft.json
    python tools/bench/pqf.py ftcurve --configs 64:small:off 64:large:on --epochs 1 \
        --train-limit 2000 --distill -o pqf_ftcurve.json
    python tools/bench/pqf.py timing -o pqf_timing.json     # torchvision resnet18, random weights
    python tools/bench/pqf.py speed --threads 2             # training images/s, plain vs PQ

Every point is a real packed file (packer.compress.pack): `file_bytes` are bytes on disk and
`ratio` is fp32 bytes / file bytes; top-1 is measured by loading that file with the runtime.
"""

from __future__ import annotations

import packer  # noqa: F401  first: it sets the OpenMP wait policy, read when torch loads

# isort: split
import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from packer.compress import PackRequest, compressible_weights, pack
from packer.config import build_config
from packer.methods import CompressJob
from packer.methods.pqf import PQFMethod
from packer.methods.pqf.kmeans import kmeans
from packer.methods.pqf.layers import attach_pq, subvectors
from packer.methods.pqf.method import distillation_loss
from packer.training import DataSpec, build_datasets
from runtime import load
from runtime.data import ShardSampler, cifar10_dataset, collate_skipping, make_loader
from runtime.evaluate import evaluate
from runtime.zoo.cifar_resnet import cifar_resnet20

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("WEIGHTPACK_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models/cifar10/resnet20-cifar10jpg.pth"
DATA = SHARED / "data/cifar10"
BASELINE_TOP1 = 88.25


def _point(overrides: list[str], val_limit: int | None, data: DataSpec | None,
           seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.fb"
        started = time.perf_counter()
        method = PQFMethod()
        report = _pack_with(method, overrides, out, data, seed)
        pack_s = time.perf_counter() - started
        model = load(out)
        test = cifar10_dataset(DATA, "test")
        top1 = evaluate(model, make_loader(test, 500, 1, limit=val_limit), progress=False).top1
    extra = method.extra_report()
    perms = extra.get("pqf_permutations", [])
    return {
        "overrides": overrides, "file_bytes": report["file_bytes"],
        "ratio": round(report["ratio"], 2), "top1": round(top1, 2),
        "drop": round(BASELINE_TOP1 - top1, 2), "val_images": val_limit or 10000,
        "reference_bits": extra.get("reference_bits"), "reference_mib": extra.get("reference_mib"),
        "groups_permuted": sum(1 for g in perms if g.get("applied")),
        "groups_skipped": sum(1 for g in perms if "skipped" in g),
        "empty_reseeded": sum(v.get("empty_reseeded", 0)
                              for v in extra.get("pqf_layers", {}).values()),
        "timings": extra.get("pqf_timings"), "finetune": extra.get("pqf_finetune"),
        "pack_s": round(pack_s, 1),
    }


def _pack_with(method: PQFMethod, overrides: list[str], out: Path, data: DataSpec | None,
               seed: int) -> dict[str, Any]:
    """Run pack() while keeping a handle on the method object it uses (for its report)."""
    import packer.methods as methods

    original = methods.METHODS["pqf"]
    methods.METHODS["pqf"] = lambda: method  # type: ignore[assignment]
    try:
        return pack(PackRequest(MODEL, out, method="pqf", overrides=overrides, progress=False,
                                data=data, seed=seed))
    finally:
        methods.METHODS["pqf"] = original


def curve(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for k in args.ks:
        for large in (False, True):
            for perm in ((False, True) if large else (False,)):
                # Small blocks on ResNet-20: every child is a 3x3 conv with d=9, so no group
                # is optimisable and permutations are a no-op; one row covers both.
                o = [f"k={k}", f"large_subvectors={str(large).lower()}",
                     f"use_permutations={str(perm).lower()}", "finetune_epochs=0",
                     f"kmeans_iters={args.kmeans_iters}", f"sls_iterations={args.sls}"]
                row = _point(o, args.val_limit, None, args.seed)
                row.update(k=k, blocks="large" if large else "small", permutations=perm,
                           epochs=0)
                print(json.dumps({k2: row[k2] for k2 in ("k", "blocks", "permutations",
                                                         "file_bytes", "ratio", "top1",
                                                         "pack_s")}), flush=True)
                rows.append(row)
    return rows


def finetune(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = DataSpec("cifar10", DATA, batch_size=args.batch_size, workers=args.workers)
    o = [f"k={args.k}", f"large_subvectors={str(args.large).lower()}",
         f"finetune_epochs={args.epochs}", f"train_limit={args.train_limit}",
         f"val_limit={args.ft_val_limit}", f"kmeans_iters={args.kmeans_iters}",
         f"sls_iterations={args.sls}", f"lr={args.lr}",
         f"distill={str(args.distill).lower()}"]
    row = _point(o + args.set, args.val_limit, data, args.seed)
    row.update(k=args.k, blocks="large" if args.large else "small", epochs=args.epochs,
               distill=args.distill,
               train_limit=args.train_limit)
    print(json.dumps(row), flush=True)
    return [row]


def ftcurve(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Short fine-tuning of several points (`--configs K:small|large:on|off ...`)."""
    rows = []
    for spec in args.configs:
        k, blocks, perm = spec.split(":")
        args.k, args.large = int(k), blocks == "large"
        args.set = [*args.base_set, f"use_permutations={'true' if perm == 'on' else 'false'}"]
        row = finetune(args)[0]
        row["permutations"] = perm == "on"
        rows.append(row)
    return rows


def _pq_resnet20(k: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the shared ResNet-20, a copy with every planned layer product-quantized at k)."""
    plain = cifar_resnet20()
    plain.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    pq = copy.deepcopy(plain)
    method = PQFMethod()
    cfg = build_config("pqf", method.options, {}, [f"k={k}", "finetune_epochs=0"])
    plans, _ = method.plan(CompressJob(pq, pq.state_dict(), compressible_weights(pq), cfg))
    for i, plan in enumerate(plans.values()):
        module = pq.get_submodule(plan.name)
        res = kmeans(subvectors(module.weight, plan.d), plan.k, 10, seed=i)
        attach_pq(module, res.centroids, res.codes)
    return plain, pq


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training images/s of plain vs PQ ResNet-20 (labels, distillation) on the real loader.

    Run with OMP_WAIT_POLICY=ACTIVE to see the spinning slowdown packer now avoids.
    """
    plain, pq = _pq_resnet20(args.k)
    teacher = copy.deepcopy(plain).eval()
    train_set, _ = build_datasets(DataSpec("cifar10", DATA))
    n = args.batches * args.batch_size
    rows = []
    for name, model, loss_fn in (
            ("plain, labels", plain, None), ("pq, labels", pq, None),
            ("pq, distillation", pq, distillation_loss(teacher, 1.0))):
        loader = DataLoader(train_set, args.batch_size, num_workers=args.workers,
                            sampler=ShardSampler(len(train_set), seed=args.seed, limit=n),
                            collate_fn=collate_skipping)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
        compute = 0.0
        for images, targets, _ in loader:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = (loss_fn(model, images, targets) if loss_fn else
                    torch.nn.functional.cross_entropy(model(images), targets))
            loss.backward()
            optimizer.step()
            compute += time.perf_counter() - started
        row = {"step": name, "images": n, "threads": torch.get_num_threads(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "compute_images_per_s": round(n / compute, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    """k-means and permutation wall time on torchvision resnet18 (random weights), CPU."""
    import torchvision

    rows = []
    for large in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        method = PQFMethod()
        cfg = build_config("pqf", method.options, {}, [
            "fc.k=2048", f"large_subvectors={str(large).lower()}", "finetune_epochs=0",
            f"kmeans_iters={args.kmeans_iters}", f"sls_iterations={args.sls}"])
        job = CompressJob(model, model.state_dict(), compressible_weights(model), cfg,
                          progress=False)
        started = time.perf_counter()
        method.compress(job)
        rep = method.extra_report()
        row = {"model": "torchvision.resnet18 (random weights)",
               "blocks": "large" if large else "small", "kmeans_iters": args.kmeans_iters,
               "sls_iterations": args.sls, "threads": torch.get_num_threads(),
               **rep["pqf_timings"], "total_s": round(time.perf_counter() - started, 1),
               "reference_bits": rep["reference_bits"], "reference_mib": rep["reference_mib"],
               "reference_ratio": rep["reference_ratio"],
               "groups_permuted": sum(1 for g in rep["pqf_permutations"] if g.get("applied"))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("curve", "finetune", "ftcurve", "timing", "speed"))
    p.add_argument("--batches", type=int, default=8, help="speed: batches per step kind")
    p.add_argument("--configs", nargs="+", default=["64:small:off"])
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--large", action="store_true")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra pqf KEY=VALUE")
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--ft-val-limit", type=int, default=1000, help="per-epoch validation images")
    p.add_argument("--val-limit", type=int, default=None, help="final test images (all)")
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--sls", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.base_set = list(args.set)
    modes = {"curve": curve, "finetune": finetune, "ftcurve": ftcurve, "timing": timing,
             "speed": speed}
    rows = modes[args.mode](args)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
