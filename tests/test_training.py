"""The shared training loop: schedule, best-state keeping, resume, data specs, and DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from packer.training import DataSpec, TrainConfig, build_datasets, fit
from runtime.data import CIFAR10_CLASSES, ShardSampler
from runtime.errors import ConfigError, DataError

torch.set_num_threads(1)


def toy_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 3, "lr": 1e-2, "batch_size": 16, "workers": 0, "progress": False,
            "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def test_fit_learns_and_keeps_the_best_epoch() -> None:
    model = toy_model()
    result = fit(model, toy_data(), toy_data(32, seed=1), cfg(epochs=4))
    assert result.epochs_run == 4 and len(result.history) == 4
    assert result.best_top1 == max([result.start_top1] + [h["top1"] for h in result.history])
    assert result.best_top1 > result.start_top1
    assert not model.training
    assert all(h["images"] == 64 and h["images_per_s"] > 0 for h in result.history)
    assert result.threads == torch.get_num_threads()


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_packer_import_makes_openmp_threads_sleep_unless_told(preset: str | None) -> None:
    # Spinning OpenMP threads made fine-tuning ~4x slower on a shared CPU (docs/PQF.md).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, packer; "
                          "print(os.environ['OMP_WAIT_POLICY'])"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == (preset or "PASSIVE")


def test_frozen_parameters_stay_frozen() -> None:
    model = toy_model()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.clone()
    fit(model, toy_data(), None, cfg(epochs=1))
    assert torch.equal(model[0].weight, before)


def test_checkpoint_resumes_and_rejects_another_schedule(tmp_path: Path) -> None:
    ckpt = tmp_path / "ft.pt"
    first = toy_model()
    fit(first, toy_data(), toy_data(32, 1), cfg(epochs=2, checkpoint=ckpt))
    assert ckpt.is_file()
    again = toy_model()
    result = fit(again, toy_data(), toy_data(32, 1), cfg(epochs=2, checkpoint=ckpt))
    assert result.resumed_from == 2 and result.epochs_run == 0
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="cannot resume"):
        fit(toy_model(), toy_data(), None, cfg(epochs=5, checkpoint=ckpt))


def test_resume_refuses_other_settings_and_names_them(tmp_path: Path) -> None:
    ckpt = tmp_path / "ft.pt"
    method = {"method": "pqf", "options": {"distill": False, "k": 16}, "seed": 0}
    fit(toy_model(), toy_data(), None, cfg(epochs=2, checkpoint=ckpt, method_settings=method))
    with pytest.raises(ConfigError, match=r"cannot resume .*training\.lr: 0\.01 -> 0\.02"):
        fit(toy_model(), toy_data(), None,
            cfg(epochs=2, lr=0.02, checkpoint=ckpt, method_settings=method))
    distilled = {**method, "options": {"distill": True, "k": 16}}
    with pytest.raises(ConfigError, match=r"method\.options\.distill: false -> true"):
        fit(toy_model(), toy_data(), None,
            cfg(epochs=2, checkpoint=ckpt, method_settings=distilled))
    wider = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with pytest.raises(ConfigError, match="model: its tensor names or shapes differ"):
        fit(wider, toy_data(), None, cfg(epochs=2, checkpoint=ckpt, method_settings=method))
    # Where the run goes and how fast it loads are not settings: the same run resumes.
    again = fit(toy_model(), toy_data(), None, cfg(epochs=2, checkpoint=ckpt, workers=0,
                                                   progress=True, method_settings=method))
    assert again.resumed_from == 2 and again.epochs_run == 0


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot resume from"):
        fit(toy_model(), toy_data(), None, cfg(epochs=1, checkpoint=junk))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": toy_model().state_dict()}, foreign)
    with pytest.raises(ConfigError, match="records no settings"):
        fit(toy_model(), toy_data(), None, cfg(epochs=1, checkpoint=foreign))


def test_epoch_sampler_is_seeded_limited_and_sharded() -> None:
    a = ShardSampler(100, rank=0, world=2, seed=3, limit=40)
    b = ShardSampler(100, rank=1, world=2, seed=3, limit=40)
    assert len(a) == len(b) == 20
    assert set(a).isdisjoint(set(b)) and list(a) == list(ShardSampler(100, 0, 2, 3, 40))
    a.set_epoch(1)
    assert list(a) != list(ShardSampler(100, 0, 2, 3, 40))


def test_bad_config_and_data_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(epochs=1, lr=0)
    with pytest.raises(DataError, match="data kind"):
        DataSpec("mnist", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not found"):
        build_datasets(DataSpec("cifar10", tmp_path / "missing"))


def make_cifar_folder(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg")
    return root


def test_cifar_datasets_are_augmented_for_training(tmp_path: Path) -> None:
    train, val = build_datasets(DataSpec("cifar10", make_cifar_folder(tmp_path)))
    assert len(train) == len(val) == 20
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert draws[0].shape == (3, 32, 32)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop / flip
    v1, _ = val[0]
    assert torch.equal(v1, val[0][0])  # validation is deterministic


def test_holdout_validates_on_unseen_train_images(tmp_path: Path) -> None:
    root = make_cifar_folder(tmp_path)
    train, val = build_datasets(DataSpec("cifar10", root), holdout=6, seed=3)
    assert (len(train), len(val)) == (14, 6)
    held = {val.dataset.samples[i][0] for i in val.indices}
    kept = {train.dataset.samples[i][0] for i in train.indices}
    assert not held & kept and all("/train/" in str(f) for f in held)
    assert torch.equal(val[0][0], val[0][0])  # plain transform on the held-out images
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(5))  # augmented
    again, _ = build_datasets(DataSpec("cifar10", root), holdout=6, seed=3)
    assert again.indices == train.indices  # seeded
    with pytest.raises(DataError, match="hold out 20 of 20"):
        build_datasets(DataSpec("cifar10", root), holdout=20)


def test_epoch_lines_are_logged_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    fit(toy_model(), toy_data(), toy_data(32, seed=1), cfg(epochs=2))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 2 and "top-1" in lines[0] and "images/s" in lines[0]
    fit(toy_model(), toy_data(), toy_data(32, seed=1), cfg(epochs=1, log_epochs=False))
    assert "epoch " not in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = toy_model()
        if rank == 1:  # DDP must broadcast rank 0's start state
            with torch.no_grad():
                model[0].weight.add_(1.0)
        result = fit(model, toy_data(), toy_data(30, 1), cfg(epochs=1, max_batches=3))
        torch.save({"state": model.state_dict(), "history": result.history,
                    "world": result.world_size}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_agrees_across_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # gradients were averaged
    # 2 steps x 16 images x 2 ranks summed (64 images sharded); validation split, not doubled.
    assert r0["history"][0]["images"] == 64 == r1["history"][0]["images"]
    assert r0["history"][0]["top1"] == r1["history"][0]["top1"]
