"""`prune` and trained weight sharing: masks per criterion against hand-computed cases, the mask
held through training, the fixed zero cluster and gradient sharing, bad input, and the
prune -> k-means -> int8 chain end to end on the shared ResNet-20."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from packer.compress import PackRequest, pack
from packer.methods import resolve_method
from packer.methods.kmeans import attach_shared, detach_shared, kmeans_share, zero_centroids
from packer.methods.prune import PruneMethod
from packer.methods.prune.criteria import ecs_keep, keep_count, keep_top
from packer.methods.prune.method import (
    attach_masks,
    detach_masks,
    loss_gradients,
    rezero_pruned,
    snip_scores,
)
from packer.training import DataSpec, TrainConfig, TrainHooks, fit
from runtime import load
from runtime.errors import ConfigError, DataError
from runtime.format.reader import open_packed
from runtime.quant.weights import int8_weight
from runtime.tensors import RawTensor, ScalarCodebookTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.ddp import run_two_ranks
from tests.packing import method_job

torch.set_num_threads(1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- criteria, hand-computed --------------------------------------------------------------


def test_keep_count_rounds_half_up_and_keeps_one() -> None:
    assert [keep_count(d, 10) for d in (0.05, 0.15, 0.2, 0.25, 1.0)] == [1, 2, 2, 3, 10]
    assert keep_count(0.001, 10) == 1


def test_magnitude_global_pool_ranks_across_layers() -> None:
    scores = {"a": t(0.1, -0.9, 0.3).abs(), "b": t(0.5, -0.2, 0.05, 0.7).reshape(2, 2).abs()}
    masks = keep_top(scores, 3 / 7)  # 3 of 7: |0.9|, |0.7|, |0.5|
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [False, True]]


def test_ties_go_to_the_lower_index() -> None:
    masks = keep_top({"a": torch.ones(3), "b": torch.ones(3)}, 0.5)
    assert masks["a"].tolist() == [True, True, True] and not masks["b"].any()


def test_ecs_keeps_a_weight_when_its_weight_or_gradient_ranks_high() -> None:
    w = {"l": torch.arange(1.0, 11.0)}  # |w| = 1..10
    g = {"l": torch.arange(10.0, 0.0, -1.0)}  # |g| = 10..1: the small weights have big grads
    # reference: both thresholds at numpy's 80th percentile, 8.2: |w| >= 8.2 keeps 9, 10 and
    # |g| >= 8.2 keeps the first two: 4 weights, 2 x density
    assert np.percentile(np.arange(1.0, 11.0), 80) == pytest.approx(8.2)
    ref = ecs_keep(w, g, 0.2, "reference")["l"]
    assert torch.nonzero(ref).flatten().tolist() == [0, 1, 8, 9]
    # exact: 2 weights, the best rank by either score: index 9 (|w| rank 0), index 0 (|g|
    # rank 0); the rank-1 pair (8 and 1) is left out
    exact = ecs_keep(w, g, 0.2, "exact")["l"]
    assert torch.nonzero(exact).flatten().tolist() == [0, 9]
    # a low-magnitude weight with a high gradient survives, as the reference intends
    assert exact[0] and not keep_top({"l": w["l"]}, 0.2)["l"][0]


def test_ecs_global_percentile_spans_layers() -> None:
    w = {"a": t(9.0, 1.0), "b": t(2.0, 3.0, 4.0)}
    g = {"a": t(0.0, 0.1), "b": t(5.0, 0.0, 0.0)}
    masks = ecs_keep(w, g, 0.4, "exact")  # 2 of 5: |w| rank 0 (a[0]), |g| rank 0 (b[0])
    assert masks["a"].tolist() == [True, False] and masks["b"].tolist() == [True, False, False]
    per_layer = ecs_keep({"b": w["b"]}, {"b": g["b"]}, 2 / 3, "exact")  # 2 of 3
    assert per_layer["b"].tolist() == [True, False, True]  # b[2]: |w| rank 0 within b


def test_snip_score_is_the_gradient_times_the_weight() -> None:
    """Cross-entropy of a linear layer: dL/dW = (softmax(xW^T + b) - onehot)^T x / B."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    grads = loss_gradients(layer, [(x, y)], ["weight"], 1)
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    logits = x.numpy() @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    by_hand = (p - np.eye(3)[y.numpy()]).T @ x.numpy() / 5
    np.testing.assert_allclose(grads["weight"].numpy(), by_hand, rtol=1e-5, atol=1e-6)
    scores = snip_scores(layer, grads)
    np.testing.assert_allclose(scores["weight"].numpy(), np.abs(by_hand * w), rtol=1e-5,
                               atol=1e-7)
    # score_batches > 1 sums the batches' gradients
    two = loss_gradients(layer, [(x, y), (x, y), (x, y)], ["weight"], 2)
    np.testing.assert_allclose(two["weight"].numpy(), 2 * by_hand, rtol=1e-5, atol=1e-6)


# --- which layers, which density ----------------------------------------------------------


def _densities(*sets: str) -> tuple[dict[str, float], dict[str, float], list[str]]:
    method, job = method_job(PruneMethod, cifar_resnet20(), *sets)
    return method.plan(job)


def test_plan_global_pool_layerwise_globs_and_excluded_layers() -> None:
    pool, own, dense = _densities("density=0.3", "layer3.*.density=0.1", "prune_first=false")
    assert "conv1.weight" not in pool and any("conv1" in d for d in dense)
    assert own == {f"layer3.{i}.conv{j}.weight": 0.1 for i in range(3) for j in (1, 2)}
    assert pool["linear.weight"] == 0.3 and len(pool) == 13  # layer1, layer2, linear
    pool, own, _ = _densities("scope=layerwise", "retain=0.05", "linear.retain=0.5",
                              "prune_last=false")
    assert not pool and own["layer1.0.conv1.weight"] == 0.05 and "linear.weight" not in own


def test_magnitude_masks_keep_exactly_the_density(tmp_path: Path) -> None:
    model = cifar_resnet20()
    method, job = method_job(PruneMethod, model, "density=0.25", "layer1.*.density=0.5")
    pool, own = method.plan(job)[:2]
    masks = method.masks(job, pool, own)
    for name in own:
        assert int(masks[name].sum()) == keep_count(0.5, masks[name].numel())
    assert sum(int(masks[n].sum()) for n in pool) == keep_count(
        0.25, sum(masks[n].numel() for n in pool))
    # global magnitude: every kept weight of the pool beats every pruned one
    params = dict(model.named_parameters())
    kept = torch.cat([params[n].detach().abs()[masks[n]] for n in pool])
    dropped = torch.cat([params[n].detach().abs()[~masks[n]] for n in pool])
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize(("sets", "message"), [
    (["density=0"], "density: must be in \\(0, 1\\]"),
    (["density=1.5"], "density: must be in \\(0, 1\\]"),
    (["retain=-0.1"], "retain: must be in"),
    (["layer3.*.density=2"], "must be in"),
    (["criterion=random"], "not one of"),
])
def test_bad_options_are_refused(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        method_job(PruneMethod, cifar_resnet20(), *sets)


def test_a_density_glob_that_names_no_layer_is_refused() -> None:
    method, job = method_job(PruneMethod, cifar_resnet20(), "layer9.*.density=0.5")
    with pytest.raises(ConfigError, match="layer9.\\*.density names no layer.*conv1"):
        method.plan(job)


def test_impossible_prune_chains_are_refused() -> None:
    with pytest.raises(ConfigError, match="prune \\(sparsity\\) must come before kmeans"):
        resolve_method("kmeans+prune")
    with pytest.raises(ConfigError, match="int8 \\(grid snapping\\)"):
        resolve_method("prune+int8+kmeans")


def test_criteria_that_need_data_say_so() -> None:
    for sets in (["criterion=snip"], ["criterion=ecs"], ["finetune_epochs=2"]):
        method, job = method_job(PruneMethod, cifar_resnet20(), *sets)
        with pytest.raises(DataError, match="--cifar10 DIR"):
            method.compress(job)


def test_cli_bad_input_exits_2_without_output(tmp_path: Path, shared_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from packer.cli import main

    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    for method, sets, message in (
            ("prune", ["density=0"], "density: must be in (0, 1]"),
            ("int8+kmeans", [], "impossible chain order"),
            ("prune", ["layer7.density=0.1"], "layer glob 'layer7' (from --set")):
        out = tmp_path / "x.fb"
        args = ["compress", str(source), "-o", str(out), "--method", method, "--no-progress"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("packer: error:") and message in err and err.count("\n") == 1
        assert not list(tmp_path.iterdir())  # no partial output


# --- the mask through training -----------------------------------------------------------


def toy() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), \
        TensorDataset(x, (x[:, 0] > 0).long())


def test_mask_holds_at_every_step_with_momentum_and_weight_decay() -> None:
    model, data = toy()
    masks = keep_top({"0.weight": model[0].weight.detach().abs(),
                      "2.weight": model[2].weight.detach().abs()}, 0.3)
    attach_masks(model, masks)
    steps = []

    def after_step(net: nn.Module) -> None:
        rezero_pruned(net)
        for name, mask in masks.items():
            layer = net.get_submodule(name.split(".")[0])
            assert torch.count_nonzero(layer.weight_orig[~mask]) == 0  # re-zeroed
            assert torch.count_nonzero(layer.weight_orig.grad[~mask]) == 0  # masked gradient
            assert torch.count_nonzero(layer.weight[~mask]) == 0
        steps.append(1)

    before = model[0].weight_orig.detach().clone()
    cfg = TrainConfig(epochs=3, lr=0.1, weight_decay=0.01, batch_size=16, workers=0,
                      progress=False, device="cpu", optimizer="sgd", log_epochs=False)
    fit(model, data, None, cfg, TrainHooks(after_step=after_step))
    assert len(steps) == 18
    assert not torch.equal(model[0].weight_orig[masks["0.weight"]], before[masks["0.weight"]])
    detach_masks(model, masks)
    assert isinstance(model[0].weight, nn.Parameter) and not hasattr(model[0], "weight_mask")
    for name, mask in masks.items():
        weight = model.get_submodule(name.split(".")[0]).weight
        assert torch.equal(weight != 0, mask)  # zeros exactly where pruned (kept ones moved)


# --- weight sharing after pruning --------------------------------------------------------


def test_zero_cluster_is_fixed_and_centroid_gradient_is_the_members_sum() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(12, 6)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.15] = 0
    pruned = layer.weight.detach().clone()
    shared = kmeans_share(pruned, 5, 30)
    assert shared.codebook[0] == 0 and torch.equal(shared.indices == 0, pruned == 0)
    assert torch.equal(shared.dequantize() == 0, pruned == 0)  # sparsity survives k-means
    # the gradient of the plain layer with the shared weights, member by member
    plain = nn.Linear(12, 6)
    with torch.no_grad():
        plain.weight.copy_(shared.dequantize())
        plain.bias.copy_(layer.bias)
    x = torch.randn(7, 12)
    plain(x).pow(2).sum().backward()
    member_sum = torch.zeros(5).index_add_(0, shared.indices.reshape(-1),
                                           plain.weight.grad.reshape(-1))
    attach_shared(layer, shared, fixed_zero=True)
    layer(x).pow(2).sum().backward()
    grad = layer.weight_codebook.grad.reshape(-1)
    torch.testing.assert_close(grad[1:], member_sum[1:])
    assert grad[0] == 0 and member_sum[0] != 0  # the zero cluster gets none of its members'


def test_shared_centroids_train_and_the_zero_centroid_stays_zero() -> None:
    model, data = toy()
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.2] = 0
    shared = kmeans_share(model[0].weight, 8, 30)
    attach_shared(model[0], shared, fixed_zero=True)
    cfg = TrainConfig(epochs=2, lr=0.05, weight_decay=0.01, batch_size=16, workers=0,
                      progress=False, device="cpu", optimizer="adam", log_epochs=False)
    fit(model, data, None, cfg, TrainHooks(after_step=zero_centroids))
    trained = detach_shared(model[0])
    assert trained.codebook[0] == 0 and torch.equal(trained.indices, shared.indices)
    assert not torch.equal(trained.codebook[1:], shared.codebook[1:])  # centroids moved
    assert torch.equal(model[0].weight.detach(), trained.dequantize())


# --- end to end ---------------------------------------------------------------------------


def test_prune_kmeans_int8_chain_end_to_end(tmp_path: Path, shared_dir: Path) -> None:
    """A couple of batches of every step: SNIP scores, mask fine-tuning, centroid training."""
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    data = DataSpec("cifar10", shared_dir / "data" / "cifar10", batch_size=32, workers=0)
    out = tmp_path / "chain.fb"
    method = "prune+kmeans+int8"
    report = pack(PackRequest(source, out, method, progress=False, data=data, overrides=[
        "criterion=snip", "density=0.2", "k=8", "finetune_epochs=1", "train_limit=64",
        "holdout=64", "prune_first=false"]))
    assert report["prune"]["criterion"] == "snip"
    assert report["prune"]["finetune"]["epochs_run"] == 1
    assert report["prune"]["finetune"]["validated_on"] == "64 held-out train images"
    assert report["kmeans_finetune"]["epochs_run"] == 1
    with open_packed(out) as packed:
        assert packed.model.method == method
        stages = json.loads(packed.model.method_config_json)["stages"]
        assert [s["method"] for s in stages] == ["prune", "kmeans", "int8"]
        coders = {s.coder for t in packed.model.tensors for _, s in t.streams()}
    assert "runs" in coders  # sparse index streams: auto chose it for some
    model = load(out)
    weights = {n: w for n, w in model.state_dict().items()
               if n.endswith("weight") and w.dim() in (2, 4)}
    zeros = sum(int((w == 0).sum()) for n, w in weights.items() if n != "conv1.weight")
    total = sum(w.numel() for n, w in weights.items() if n != "conv1.weight")
    assert zeros / total == pytest.approx(0.8, abs=0.005)  # the zero cluster survived
    assert (weights["conv1.weight"] == 0).sum() == 0  # prune_first=false
    from runtime.decode import decode_tensor
    with open_packed(out) as packed:
        for record in packed.model.tensors:
            if record.name in weights:
                tensor = decode_tensor(packed, record)
                assert isinstance(tensor, ScalarCodebookTensor)
                assert tensor.codebook.numel() <= 8
                assert int8_weight(tensor.dequantize(), tensor).exact  # snapped to int8


def test_standalone_prune_stores_raw_weights_with_exact_zeros(tmp_path: Path,
                                                              shared_dir: Path) -> None:
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path / "pruned.fb"
    report = pack(PackRequest(source, out, "prune", progress=False,
                              overrides=["density=0.1", "scope=layerwise"]))
    assert report["prune"]["density"] == pytest.approx(0.1, abs=0.001)
    original = torch.load(source, weights_only=True)
    pruned = load(out).state_dict()
    for name, layer in report["prune"]["layers"].items():
        kept = pruned[name] != 0
        assert int(kept.sum()) == layer["kept"] == keep_count(0.1, layer["numel"])
        assert torch.equal(pruned[name][kept], original[name][kept])  # kept weights as they were
    from runtime.decode import decode_tensor
    with open_packed(out) as packed:
        record = next(r for r in packed.model.tensors if r.name == "layer3.0.conv2.weight")
        assert isinstance(decode_tensor(packed, record), RawTensor)
        assert record.values.coder in ("runs", "zstd", "ans")


# --- resumable and distributed fine-tuning -------------------------------------------------


def test_prune_finetuning_resumes_from_its_stage_checkpoint(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=10, workers=0)
    sets = ("criterion=snip", "density=0.3", "finetune_epochs=1", "holdout=5",
            f"checkpoint={tmp_path / 'ft.pt'}")
    method, job = method_job(PruneMethod, cifar_resnet20(), *sets, data=data)
    first = method.compress(job)
    assert (tmp_path / "ft.prune.pt").is_file()  # the stage's own file
    assert method.extra_report()["prune"]["finetune"]["epochs_run"] == 1
    method, job = method_job(PruneMethod, cifar_resnet20(), *sets, data=data)
    again = method.compress(job)
    ft = method.extra_report()["prune"]["finetune"]
    assert ft["resumed_from"] == 1 and ft["epochs_run"] == 0
    for name, tensor in first.items():
        assert torch.equal(tensor.dequantize(), again[name].dequantize()), name


def _prune_worker(rank: int, out: str, root: str) -> None:
    model = cifar_resnet20()
    if rank == 1:  # scores differ on this rank: rank 0's mask must still win (the mask is
        # a buffer, and DistributedDataParallel broadcasts rank 0's buffers)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(torch.rand_like(p))
    data = DataSpec("cifar10", Path(root), batch_size=5, workers=0)
    method, job = method_job(PruneMethod, model, "density=0.3", "finetune_epochs=1",
                             "holdout=4", data=data)
    out_tensors = method.compress(job)
    torch.save({n: t.dequantize() for n, t in out_tensors.items()}, f"{out}/rank{rank}.pt")


def test_two_process_ddp_prunes_the_same_weights(tmp_path: Path) -> None:
    r0, r1 = run_two_ranks(_prune_worker, tmp_path)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # one mask, one averaged training
    zeros = sum(int((w == 0).sum()) for w in r0.values())
    assert zeros == sum(w.numel() for w in r0.values()) - keep_count(
        0.3, sum(w.numel() for w in r0.values()))
