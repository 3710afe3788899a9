"""The fine-tuning stage that `prune` and `kmeans` share: its options (which data, how many
epochs, which optimizer, validation on a held-out split, a resumable checkpoint per stage,
optional distillation from the model the stage started from) and the call into the shared
`packer.training.finetune`. The methods decide what is trainable and what each step must
re-impose (`after_step`: the mask, the zero centroid).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from packer.config import Option, closed_interval
from packer.methods.base import CompressJob
from packer.training import build_datasets, epochs_to_run, training_data
from packer.training.finetune import finetune


def finetune_options(default_epochs: int, lr: float, optimizer: str,
                     weight_decay: float) -> dict[str, Option]:
    """The fine-tuning options of a method, with that method's defaults."""
    return {
        "finetune_epochs": Option(None, f"fine-tuning epochs (default: {default_epochs} with "
                                  f"training data, 0 without)", int,
                                  check=closed_interval(0, 1000, "finetune_epochs"),
                                  per_layer=False),
        "lr": Option(lr, "learning rate (cosine to lr_min, stepped per batch)", float,
                     check=closed_interval(1e-9, 10.0, "lr"), per_layer=False),
        "lr_min": Option(0.0, "final learning rate of the cosine schedule", float,
                         check=closed_interval(0.0, 10.0, "lr_min"), per_layer=False),
        "optimizer": Option(optimizer, "sgd (momentum 0.9) or adam", str,
                            choices=("sgd", "adam"), per_layer=False),
        "weight_decay": Option(weight_decay, "weight decay", float,
                               check=closed_interval(0.0, 1.0, "weight_decay"), per_layer=False),
        "train_limit": Option(0, "training images per epoch, drawn at random (0: all)", int,
                              check=closed_interval(0, 10**9, "train_limit"), per_layer=False),
        "val_limit": Option(0, "validation images (0: all)", int,
                            check=closed_interval(0, 10**9, "val_limit"), per_layer=False),
        "holdout": Option(0, "training images held out (seeded) for the per-epoch validation "
                          "that picks the best epoch; 0: validate on the test/val split", int,
                          check=closed_interval(0, 10**9, "holdout"), per_layer=False),
        "distill": Option(False, "fine-tune against the outputs of the model this stage "
                          "started from (knowledge distillation) instead of the labels", bool,
                          per_layer=False),
        "distill_temperature": Option(4.0, "softmax temperature of the distillation loss",
                                      float,
                                      check=closed_interval(0.05, 100.0, "distill_temperature"),
                                      per_layer=False),
        "checkpoint": Option(None, "fine-tuning checkpoint FILE: each stage writes and resumes "
                             "from FILE with its name before the suffix (ft.prune.pt; a "
                             "stage after others adds a digest of their settings: "
                             "ft.kmeans.3f2a9c01d4.pt)", str,
                             per_layer=False),
    }


def finetune_epochs(job: CompressJob, method: str, default: int) -> int:
    """The epochs to run: `finetune_epochs`, or `default` when training data was given and 0
    when not; asking for epochs without data is an error, not a silent skip."""
    return epochs_to_run(job.config.options["finetune_epochs"], training_data(job.data, method),
                         method, "finetune_epochs", default, "no fine-tuning")


def stage_checkpoint(path: str | None, method: str,
                     upstream: Sequence[dict[str, Any]] = ()) -> Path | None:
    """`ft.pt` -> `ft.prune.pt`: chained stages fine-tune different parameters. A stage
    after others (`upstream`: their settings) gets a digest of them in its name
    (`ft.kmeans.3f2a9c01d4.pt`), so runs that differ before it keep separate files."""
    if not path:
        return None
    p = Path(path)
    digest = ""
    if upstream:
        text = json.dumps(list(upstream), sort_keys=True, default=str)
        digest = "." + hashlib.sha256(text.encode()).hexdigest()[:10]
    return p.with_name(f"{p.stem}.{method}{digest}{p.suffix or '.pt'}")


def teacher_of(job: CompressJob, epochs: int) -> nn.Module | None:
    """A frozen copy of the model as the stage received it, when distillation is asked."""
    if not (job.config.options["distill"] and epochs > 0):
        return None
    return copy.deepcopy(job.model).eval()


def run_finetune(job: CompressJob, method: str, epochs: int, teacher: nn.Module | None,
                 after_step: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Train `job.model`'s trainable parameters (the method chose them) for `epochs` through
    the shared `packer.training.finetune`; returns its report. The model holds the best
    epoch's state (chosen on `holdout` when set)."""
    opts = job.config.options
    data = training_data(job.data, method)
    assert data is not None and epochs > 0
    train_set, val_set = build_datasets(data, opts["holdout"], job.seed)
    report = finetune(job, epochs, data, train_set, val_set, teacher, after_step=after_step,
                      train_all=False, optimizer=opts["optimizer"],
                      weight_decay=opts["weight_decay"],
                      checkpoint=stage_checkpoint(opts["checkpoint"], method,
                                                  job.upstream))
    return {**report, "optimizer": opts["optimizer"], "lr": opts["lr"],
            "distill": teacher is not None}
