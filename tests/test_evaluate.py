"""The evaluation loop: accuracy of the shared ResNet-20, and distributed == single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from runtime import data, zoo
from runtime.errors import DataError
from runtime.evaluate import EvalResult, eval_plan, evaluate, fold_batchnorm
from tests.assets import require

DIST_LIMIT = 69  # odd on purpose: the two shards differ in size and must not be padded


def cifar_resnet20(shared_dir: Path) -> torch.nn.Module:
    path = require(shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth",
                   "shared ResNet-20 checkpoint")
    model = zoo.build("cifar_resnet20")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def cifar_test(shared_dir: Path) -> data.ImageFiles:
    path = require(shared_dir / "data" / "cifar10" / "test", "shared CIFAR-10 test folder")
    return data.cifar10_dataset(path.parent, split="test")


def test_resnet20_on_500_cifar_images(shared_dir: Path) -> None:
    model, dataset = cifar_resnet20(shared_dir), cifar_test(shared_dir)
    loader = data.make_loader(dataset, batch_size=100, workers=0, limit=500)
    result = evaluate(model, loader, progress=False)
    print(f"resnet20-cifar10jpg on 500 test images: {result}")
    assert result.images == 500 and result.skipped == 0
    assert 80.0 <= result.top1 <= 95.0  # 88.25 on all 10,000
    assert result.top1 <= result.top5 <= 100.0
    assert result.images_per_s > 0 and result.seconds > 0


def test_callable_model_and_plain_batches() -> None:
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 9, 9, 9, 9]), 10).float()
    logits[4:, 4:8] = torch.eye(4) * 0.5  # right class ranked 2nd for the last four

    def model(x: Tensor) -> Tensor:
        return logits[x[:, 0].long()]

    batches = [(torch.arange(8).float().unsqueeze(1), targets)]
    result = evaluate(model, batches, progress=False)
    assert (result.top1, result.top5, result.images) == (50.0, 100.0, 8)


def test_fewer_than_five_classes_top5_is_top1() -> None:
    def model(x: Tensor) -> Tensor:
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)

    result = evaluate(model, [(torch.zeros(4, 1), torch.tensor([0, 1, 0, 2]))], progress=False)
    assert result.top1 == result.top5 == 50.0


def test_all_skipped_is_an_error() -> None:
    empty = data.Batch(torch.empty(0), torch.empty(0, dtype=torch.long), 3)
    with pytest.raises(DataError, match="3 unreadable"):
        evaluate(lambda x: x, [empty], progress=False)


def _dist_worker(rank: int, world: int, store: str, shared_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, dataset = cifar_resnet20(Path(shared_dir)), cifar_test(Path(shared_dir))
        loader = data.make_loader(dataset, 16, 0, limit=DIST_LIMIT, distributed=True)
        result = evaluate(model, loader, progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result.as_dict()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_gloo_equals_single_process(shared_dir: Path, tmp_path: Path) -> None:
    model, dataset = cifar_resnet20(shared_dir), cifar_test(shared_dir)
    single = evaluate(model, data.make_loader(dataset, 16, 0, limit=DIST_LIMIT), progress=False)
    args = (2, str(tmp_path / "store"), str(shared_dir), str(tmp_path))
    mp.spawn(_dist_worker, args=args, nprocs=2, join=True)
    for rank in (0, 1):
        reduced = EvalResult(**json.loads((tmp_path / f"rank{rank}.json").read_text()))
        assert reduced.images == single.images == DIST_LIMIT
        assert (reduced.top1, reduced.top5, reduced.skipped) == (
            single.top1,
            single.top5,
            single.skipped,
        )


@pytest.mark.parametrize(("device", "cores", "workers", "plan"), [
    ("cpu", 1, None, (0, 1)),
    ("cpu", 2, None, (0, 2)),  # measured: 0 workers beat 1 and 4 on 2 cores
    ("cpu", 16, None, (4, 12)),
    ("cpu", 64, None, (4, 60)),
    ("cpu", 2, 3, (3, 1)),  # asked for: the model keeps one thread
    ("cuda", 2, None, (1, None)),
    ("cuda", 16, None, (8, None)),
])
def test_eval_plan_uses_each_core_once(device: str, cores: int, workers: int | None,
                                       plan: tuple[int, int | None]) -> None:
    got = eval_plan(device, workers, cores=cores)
    assert (got.workers, got.threads) == plan


def test_eval_plan_sets_and_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    with eval_plan("cpu", 0, cores=1).applied():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fold_batchnorm_keeps_the_outputs(shared_dir: Path) -> None:
    model = cifar_resnet20(shared_dir).eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_an_untraceable_model_alone() -> None:
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = Branchy()
    assert fold_batchnorm(model) is model


def test_eval_plan_shares_the_cores_among_local_processes(monkeypatch) -> None:
    monkeypatch.setattr("runtime.evaluate.usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert eval_plan("cpu") == eval_plan("cpu", cores=4)


def test_inference_model_is_channels_last_on_cpu_and_computes_the_same() -> None:
    from runtime.evaluate import ChannelsLast, inference_model
    from runtime.zoo.cifar_resnet import cifar_resnet20

    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    fast = inference_model(model, "cpu")
    assert isinstance(fast, ChannelsLast)
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
