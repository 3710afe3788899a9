"""PQF: k-means, layer plans, permutations that keep the function, size rule, packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from packer.compress import PackRequest, pack
from packer.config import build_config
from packer.methods import METHODS, CompressJob
from packer.methods.pqf import PQFMethod
from packer.methods.pqf.kmeans import assign, kmeans
from packer.methods.pqf.layers import codebook_size, plan_layer
from packer.methods.pqf.permute import find_groups, optimise, permute_model
from packer.methods.pqf.size import reference_size
from packer.training import DataSpec
from runtime import load
from runtime.errors import ConfigError, DataError
from runtime.tensors import VectorCodebookTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.packing import method_job

torch.set_num_threads(1)


def job_for(model: nn.Module, *sets: str, data=None) -> tuple[PQFMethod, CompressJob]:
    return method_job(PQFMethod, model, *sets, data=data)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# --- k-means --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kmeans", "src"])
def test_kmeans_is_seeded_and_codes_match_centroids(kind: str) -> None:
    x = torch.randn(3000, 9, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 32, 8, kind=kind, seed=5)
    b = kmeans(x, 32, 8, kind=kind, seed=5)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    codes, d2 = assign(x, a.centroids)
    assert torch.equal(codes, a.codes)  # the reference returned stale codes; we do not
    assert a.mse == pytest.approx(float(d2.double().sum()) / 3000, rel=1e-5)
    assert a.mse < kmeans(x, 32, 0, kind="kmeans", init="random", seed=5).mse


def test_chunked_assignment_equals_one_shot() -> None:
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(2))
    c = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(assign(x, c, chunk_elems=16 * 7)[0], assign(x, c)[0])


def test_empty_clusters_are_reseeded_and_counted() -> None:
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2), torch.full((50, 2), 2.0)])
    res = kmeans(x, 8, 5, kind="kmeans", init="random", seed=0)
    assert res.empty_reseeded > 0
    assert torch.bincount(res.codes, minlength=8).gt(0).sum() >= 3
    assert res.mse == pytest.approx(0.0, abs=1e-6)


# --- plans, bad input -----------------------------------------------------------------------


def test_subvector_sizes_k_rule_and_fallbacks() -> None:
    opts = PQFMethod.options
    base = {k: o.default for k, o in opts.items()}
    assert codebook_size(256, 64 * 64) == 256 and codebook_size(256, 16 * 16) == 64
    assert codebook_size(256, 7) == 0
    plan, _ = plan_layer("c", nn.Conv2d(64, 64, 3), base)
    assert (plan.d, plan.k, plan.n) == (9, 256, 4096)
    plan, _ = plan_layer("c", nn.Conv2d(3, 64, 3), {**base, "large_subvectors": True})
    assert plan.d == 9 and "not divisible by d=18" in plan.notes[0]
    plan, _ = plan_layer("p", nn.Conv2d(64, 128, 1), base)
    assert plan.d == 4
    plan, _ = plan_layer("f", nn.Linear(6, 40), base)
    assert plan.d == 3 and plan.notes
    plan, why = plan_layer("t", nn.Linear(4, 3), base)
    assert plan is None and "fewer than 8" in why
    plan, why = plan_layer("g", nn.Conv2d(8, 8, 3, groups=8), base)
    assert plan is None and "grouped" in why


def test_bad_input_messages() -> None:
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)  # first conv: kept, so nothing is left

    method, job = job_for(NoLayers(), "finetune_epochs=0")
    with pytest.raises(ConfigError, match="no layer can be product-quantized"):
        method.compress(job)
    method, job = job_for(cifar_resnet20(), "finetune_epochs=2")
    with pytest.raises(DataError, match="needs training data"):
        method.compress(job)
    method, job = job_for(cifar_resnet20())  # no data, and no explicit finetune_epochs=0
    with pytest.raises(DataError, match="finetune_epochs=0"):
        method.compress(job)
    with pytest.raises(ConfigError, match="kmeans_type"):
        build_config("pqf", PQFMethod.options, {}, ["kmeans_type=fast"])
    with pytest.raises(ConfigError, match="whole model"):
        build_config("pqf", PQFMethod.options, {}, ["fc.use_permutations=false"])


# --- size rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "bits", "mib", "ratio"), [
    ([], 12_927_232, 1.54, 28.94),
    (["large_subvectors=true"], 8_634_624, 1.03, 43.32),
])
def test_reference_size_rule_matches_the_paper_for_resnet18(sets, bits, mib, ratio) -> None:
    model = torchvision.models.resnet18()
    method, job = job_for(model, "fc.k=2048", *sets)
    plans, skipped = method.plan(job)
    size = reference_size(model, plans)
    assert size["reference_uncompressed_bits"] == 11_689_512 * 32
    assert (size["reference_bits"], size["reference_mib"], size["reference_ratio"]) == \
        (bits, mib, ratio)
    assert skipped == ["conv1: first conv kept uncompressed (keep_first_conv=true)"]


# --- permutations ---------------------------------------------------------------------------


class Streams(nn.Module):
    """A residual stream of 1x1 convs read by a Linear: every group is optimisable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 32, 1)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 16, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_permutations_keep_the_function_and_lower_the_objective() -> None:
    torch.manual_seed(0)
    model = randomise_bn(Streams())
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    report = permute_model(model, {"a": 4, "b": 8, "fc": 4}, iterations=400, seed=0)
    applied = [g for g in report if g.get("applied")]
    assert {tuple(g["writers"]) for g in applied} == {("stem", "b"), ("a",)}
    assert all(g["objective_after"] < g["objective_before"] for g in applied)
    stream = next(g for g in applied if g["writers"] == ["stem", "b"])
    assert stream["readers"] == ["a", "fc"] and stream["norms"] == ["bn", "bn_b"]
    assert torch.allclose(model(x), before, atol=1e-5)


def test_resnet20_groups_pad_shortcuts_skipped_and_function_kept() -> None:
    torch.manual_seed(0)
    model = randomise_bn(cifar_resnet20())
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    d = {n: 18 for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} | {"linear": 4}
    report = permute_model(model, d, iterations=100, seed=0)
    assert sum(1 for g in report if g.get("applied")) == 9  # the conv1 -> conv2 of each block
    streams = [g for g in report if len(g["writers"]) > 1]
    assert len(streams) == 3 and all("option-A pad shortcut" in g["skipped"] for g in streams)
    assert torch.allclose(model(x), before, atol=1e-5)
    small = permute_model(cifar_resnet20(), {k: 9 for k in d}, iterations=10, seed=0)
    assert not any(g.get("applied") for g in small)


def _expected_cifar_resnet_groups(blocks: int) -> list[tuple[list[str], list[str], list[str],
                                                              bool]]:
    """(writers, norms, readers, blocked) of every channel space of a CIFAR ResNet, as the
    permutation search found them when it still knew the zoo's pad-shortcut class."""
    groups: list[tuple[list[str], list[str], list[str], bool]] = [([], [], ["conv1"], True)]
    for stage in (1, 2, 3):
        names = [f"layer{stage}.{i}" for i in range(blocks)]
        groups += [([f"{b}.conv1"], [f"{b}.bn1"], [f"{b}.conv2"], False) for b in names]
        head = ["conv1"] if stage == 1 else []
        norms = ["bn1"] if stage == 1 else []
        readers = [f"{b}.conv1" for b in (names if stage == 1 else names[1:])]
        readers.append(f"layer{stage + 1}.0.conv1" if stage < 3 else "linear")
        groups.append((head + [f"{b}.conv2" for b in names], norms + [f"{b}.bn2" for b in names],
                       readers, True))  # the residual stream, tied to the next by zero-padding
    return groups + [(["linear"], [], [], True)]


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_groups_come_from_the_graph_unchanged(depth: int) -> None:
    from runtime.zoo import cifar_resnet

    model = getattr(cifar_resnet, f"cifar_resnet{depth}")()
    found = [(g.writers, g.norms, g.readers, bool(g.blocked)) for g in find_groups(model)]
    assert found == _expected_cifar_resnet_groups((depth - 2) // 6)
    streams = [g for g in find_groups(model) if len(g.writers) > 1]
    assert all("channel zero-padding" in "; ".join(g.blocked) for g in streams)


def test_torchvision_resnet_streams_include_downsample_and_bn() -> None:
    groups = find_groups(torchvision.models.resnet18())
    stream = next(g for g in groups if "layer2.0.downsample.0" in g.writers)
    assert "layer2.0.downsample.1" in stream.norms and "layer3.0.downsample.0" in stream.readers
    assert not stream.blocked


def test_a_permutation_that_does_not_help_is_discarded() -> None:
    w = torch.ones(8, 8, 1, 1).double().numpy()
    w[:, :, 0, 0] += torch.arange(8.0).double().numpy()
    res = optimise([(w, 4)], iterations=50, seed=0, label="g")
    assert res.perm is None and "discarded" in res.note


# --- the packer pipeline --------------------------------------------------------------------


def test_pack_writes_vector_codebooks_with_fp16_and_reports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = tmp_path / "r20.pth"
    torch.save(randomise_bn(cifar_resnet20()).state_dict(), src)
    out = tmp_path / "r20.fb"
    method = PQFMethod()
    report = pack(PackRequest(src, out, method="pqf", progress=False, overrides=[
        "k=16", "kmeans_iters=3", "large_subvectors=true", "sls_iterations=50",
        "finetune_epochs=0", "layer3.*.k=32"]))
    assert report["file_bytes"] == out.stat().st_size
    model = load(out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    method, job = job_for(randomise_bn(cifar_resnet20()), "k=16", "kmeans_iters=2",
                          "sls_iterations=20", "finetune_epochs=0")
    out_t = method.compress(job)
    assert "conv1.weight" not in out_t and len(out_t) == 19
    t = out_t["layer3.0.conv2.weight"]
    assert isinstance(t, VectorCodebookTensor) and t.codebook.dtype == torch.float16
    assert t.subvector_size == 9 and t.codebook.shape[0] == 16
    rep = method.extra_report()
    assert rep["reference_bits"] > 0 and rep["reference_mib"] > 0
    assert set(rep["pqf_layers"]["linear"]) >= {"d", "k", "mse", "empty_reseeded"}
    assert METHODS["pqf"] is PQFMethod


def test_finetune_through_the_shared_loop(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=10, workers=0)
    torch.manual_seed(0)
    model = randomise_bn(cifar_resnet20())
    method, job = job_for(model, "k=16", "kmeans_iters=2", "use_permutations=false",
                          "finetune_epochs=1", f"checkpoint={tmp_path / 'ft.pt'}", "holdout=5",
                          data=data)
    before = {k: v.clone() for k, v in job.state_dict.items()}
    out = method.compress(job)
    ft = method.extra_report()["pqf_finetune"]
    assert ft["epochs_run"] == 1 and (tmp_path / "ft.pt").is_file()
    # Codes stay as k-means left them; decoded weights and the stored state agree.
    conv = model.get_submodule("layer1.0.conv1")
    assert torch.equal(conv.weight, out["layer1.0.conv1.weight"].dequantize())
    assert torch.equal(job.state_dict["layer1.0.conv1.weight"], conv.weight)
    # 5 of the 20 train images validate instead of training
    assert ft["history"][0]["images"] == 15 and ft["best_epoch"] in (0, 1)
    assert ft["validated_on"] == "5 held-out train images"
    assert set(job.state_dict) == set(before)


def test_distillation_loss_is_zero_against_itself() -> None:
    from packer.training.finetune import distillation_loss

    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    teacher = nn.Linear(5, 3)
    teacher.load_state_dict(net.state_dict())
    x = torch.randn(4, 5)
    loss = distillation_loss(teacher, 2.0)(net, x, torch.zeros(4, dtype=torch.long))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
