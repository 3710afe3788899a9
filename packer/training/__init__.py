"""Training shared by every method that trains: the loop (`fit`, with hooks and resume), its
data, checkpoints, validation and BatchNorm recalibration. PQF and the low-bit methods
fine-tune through `finetune` (standard options, distillation), WFN and PWFN train between
fixing rounds through `fit`; see `packer.training.loop` for how a new method plugs in."""

from packer.training.batchnorm import recalibrate_batchnorm
from packer.training.checkpoint import Checkpoint, model_signature
from packer.training.data import (
    DataSpec,
    build_datasets,
    epochs_to_run,
    train_transform,
    training_data,
)
from packer.training.finetune import distillation_loss, finetune
from packer.training.loop import TrainConfig, TrainHooks, TrainResult, fit
from packer.training.validation import Validation

__all__ = [
    "Checkpoint",
    "DataSpec",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "Validation",
    "build_datasets",
    "distillation_loss",
    "finetune",
    "fit",
    "model_signature",
    "recalibrate_batchnorm",
    "train_transform",
    "training_data",
    "epochs_to_run",
]
