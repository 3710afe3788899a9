"""The shared training loop (PQF fine-tuning now; WFN and PWFN later) and its data options."""

from packer.training.data import DataSpec, build_datasets, train_transform
from packer.training.loop import (
    EpochSampler,
    TrainConfig,
    TrainHooks,
    TrainResult,
    default_device,
    fit,
    init_distributed,
    launch_rank,
    rank,
    world_size,
)

__all__ = [
    "DataSpec",
    "EpochSampler",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "build_datasets",
    "default_device",
    "fit",
    "init_distributed",
    "launch_rank",
    "rank",
    "train_transform",
    "world_size",
]
