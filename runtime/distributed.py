"""Which process am I under torchrun: process-group setup and rank checks, in one place.

torchrun starts one process per device and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). Evaluation (``runtime eval``), the packer's training
loop and the packer's output all ask the same questions, so they ask them here. Without
torchrun every answer is the single-process one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "is_distributed",
    "launch_rank",
    "launch_world_size",
    "local_device",
    "local_rank",
    "local_world_size",
    "rank",
    "world_size",
]


def launch_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """This process's torchrun rank, from its environment: known before (or without) joining
    a process group, so a tool can decide early who writes its output."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine: the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many processes torchrun started on this machine (1 without torchrun): they share
    its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Rank in the joined process group (0 when there is none)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the joined process group (1 when there is none)."""
    return dist.get_world_size() if is_distributed() else 1


def local_device() -> torch.device:
    """The GPU ``LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_distributed(cuda: bool | None = None) -> bool:
    """Join torchrun's process group when it started several processes; returns whether this
    process is now in a group (a second call is a no-op).

    With ``cuda`` (default: when CUDA is available) each process takes GPU ``LOCAL_RANK`` and
    the group uses NCCL; otherwise gloo.
    """
    if is_distributed():
        return True
    if launch_world_size() <= 1:
        return False
    if torch.cuda.is_available() if cuda is None else cuda:
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
