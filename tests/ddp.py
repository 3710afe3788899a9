"""Two-process DDP tests (gloo, forked, on the CPU): the process plumbing that the method
tests share. Each test supplies only the body a rank runs, `worker(rank, out, data_root)`,
which saves what it produced to `out/rank{rank}.pt`."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD = 2


def _rank_main(rank: int, worker: Callable[[int, str, str], None], port: int, out: str,
               data_root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        worker(rank, out, data_root)
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(worker: Callable[[int, str, str], None],
                  tmp_path: Path) -> tuple[Any, Any]:
    """Run `worker` on two ranks over a tiny CIFAR-10 folder; what each rank saved."""
    from tests.test_training import make_cifar_folder

    root = make_cifar_folder(tmp_path / "c10")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(worker, port, str(tmp_path), str(root)),
                       nprocs=WORLD, join=True, start_method="fork")
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
