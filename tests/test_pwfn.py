"""PWFN: the sigma prior and its guards, Bayesian parametrizations, the sigma regulariser,
the z-score clustering round, and the method end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from packer.config import build_config
from packer.methods import METHODS, CompressJob
from packer.methods.weightfix import PWFNMethod
from packer.methods.weightfix.bayes import (
    SIGMA_CAP,
    SIGMA_FLOOR,
    attach,
    detach_all,
    mean_parameter,
    prior_sigma,
    sigma_gradient_hook,
)
from packer.methods.weightfix.centres import pwfn_candidates
from packer.methods.weightfix.zscore import Tolerances, cluster_round
from packer.training import DataSpec
from runtime.errors import ConfigError, DataError
from tests.packing import method_job
from tests.test_wfn import power_terms

torch.set_num_threads(1)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def job_for(model: nn.Module, *sets: str, data=None) -> tuple[PWFNMethod, CompressJob]:
    return method_job(PWFNMethod, model, *sets, data=data)


# --- sigma prior ----------------------------------------------------------------------------


def test_prior_sigma_is_small_on_powers_of_two_and_guards_zero() -> None:
    mu = torch.tensor([0.25, -0.5, 1 / 3, 0.0, 0.3, 0.1, 0.7, 0.2])
    sigma = prior_sigma(mu)
    assert torch.isfinite(sigma).all()
    assert sigma[0] == sigma[1] == sigma[3] == SIGMA_FLOOR  # exact: no noise
    assert sigma[2] > sigma[4] > SIGMA_FLOOR  # 4/3 * 2^-2 is the farthest point
    assert float(sigma.max()) <= SIGMA_CAP
    assert torch.equal(prior_sigma(torch.zeros(5)), torch.full((5,), SIGMA_FLOOR))


def test_prior_sigma_handles_tensors_over_torch_quantile_limit() -> None:
    mu = torch.linspace(0.01, 1.0, 17_000_001)
    sigma = prior_sigma(mu)
    assert sigma.shape == mu.shape and torch.isfinite(sigma).all()


# --- Bayesian layers ------------------------------------------------------------------------


def test_parametrized_layer_samples_in_training_and_is_exact_in_eval() -> None:
    layer = nn.Linear(4, 3)
    weight = layer.weight.detach().clone()
    gaussian = attach(layer, "weight", prior=False)
    x = torch.randn(2, 4)
    layer.eval()
    assert torch.equal(layer.weight, weight)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # fresh noise per forward
    assert gaussian.eps is not None
    assert mean_parameter(layer, "weight") is layer.parametrizations.weight.original
    detach_all(layer)
    assert torch.equal(layer.weight, weight) and set(layer.state_dict()) == {"weight", "bias"}


def test_sigma_regulariser_pushes_sigma_up_and_respects_frozen_entries() -> None:
    layer = nn.Linear(3, 2)
    gaussian = attach(layer, "weight", prior=False)
    frozen = torch.zeros(2, 3, dtype=torch.bool)
    frozen[0, 0] = True
    gaussian.sigma.register_hook(sigma_gradient_hook(gaussian, 1.0, lambda: frozen))
    layer.train()
    (layer(torch.zeros(1, 3)).sum() * 0).backward()  # CE-free: only the prior's push
    g = gaussian.sigma.grad
    assert g[0, 0] == 0 and bool((g.reshape(-1)[1:] < 0).all())  # descent raises sigma


# --- clustering -----------------------------------------------------------------------------


def test_candidates_are_sums_of_powers_of_two_within_the_range() -> None:
    c = pwfn_candidates(0.3, 2, 7)
    assert torch.equal(c, -c.flip(0)) and 0.0 in c.tolist()
    assert float(c.abs().max()) <= 0.3
    assert all(power_terms(v) <= 2 for v in c.tolist())
    assert 2.0 ** -7 in c.tolist() and 0.25 + 2.0 ** -3 not in c.tolist()


def test_tolerance_counts_match_the_z_score_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2000, generator=g, dtype=torch.float64) * 0.1
    scale = torch.rand(2000, generator=g, dtype=torch.float64) * 0.02 + 1e-4
    c = pwfn_candidates(float(mu.abs().max()), 2, 7)
    small = mu.abs() < 2.0 ** -7
    tol = Tolerances(torch.arange(2000), mu, scale, 1.5, small)
    z = (c[:, None] - mu[None]).abs() / scale[None]
    z[c == 0] = torch.where(small, 0.0, z[c == 0])
    assert torch.equal(tol.counts(c), (z <= 1.5).sum(1))
    taken = torch.zeros(2000, dtype=torch.bool)
    taken[:500] = True
    tol.remove(taken)
    assert torch.equal(tol.counts(c), (z[:, 500:] <= 1.5).sum(1))


def test_cluster_round_reaches_target_and_joins_sigma() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5000, generator=g) * 0.1
    sigma = prior_sigma(mu)
    fixed = torch.zeros(5000, dtype=torch.bool)
    res = cluster_round(mu, sigma, fixed, 0.5, 7, 1.0, 2.0, True, "std_mu")
    assert int(res.fixed.sum()) == 2500 and res.newly_fixed == 2500
    assert torch.equal(res.values[~res.fixed], mu[~res.fixed])
    by_centre: dict[float, list[dict]] = {}
    for group in res.groups:  # a centre can be chosen again after h or the order grows
        by_centre.setdefault(group["centre"], []).append(group)
    for centre, groups in by_centre.items():
        members = res.fixed & (res.values == centre)
        assert int(members.sum()) == sum(g["count"] for g in groups)
        if len(groups) == 1:  # std_mu: one sigma, the spread of the group's means
            want = torch.tensor(max(groups[0]["mu_std"], SIGMA_FLOOR))
            assert torch.allclose(res.sigma[members], want)
    full = cluster_round(res.values, res.sigma, res.fixed, 1.0, 7, 1.0, 2.0, True,
                         "keep_the_same_divide_by_10")
    assert bool(full.fixed.all()) and torch.equal(full.values[res.fixed], res.values[res.fixed])
    assert all(power_terms(v) <= 4 for v in torch.unique(full.values).tolist())


# --- the method -----------------------------------------------------------------------------


def test_post_training_pwfn_fixes_everything_and_restores_names() -> None:
    model = small_cnn()
    method, job = job_for(model, "start_epochs=0", "rest_epochs=0")
    out = method.compress(job)
    assert set(out) == {"0.weight", "0.bias", "3.weight", "8.weight", "8.bias"}
    assert set(job.state_dict) == set(small_cnn().state_dict())
    rep = method.extra_report()
    assert rep["unique_values"] == rep["centres"] and len(rep["pwfn_iterations"]) == 10
    assert {"unique_values_nonzero", "entropy_bits", "entropy_bits_nonzero"} <= set(rep)
    for name, t in out.items():
        assert torch.equal(t.dequantize(), job.state_dict[name])
        assert all(power_terms(v) <= 4 for v in t.codebook.float().tolist())
    assert METHODS["pwfn"] is PWFNMethod


def test_pwfn_trains_sigma_and_means_with_frozen_fixed_entries(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=10, workers=0)
    method, job = job_for(small_cnn(), "start_epochs=1", "rest_epochs=1",
                          "rounds=[0.5,1.0]", f"checkpoint={tmp_path / 'p.pt'}", data=data)
    out = method.compress(job)
    log = method.extra_report()["pwfn_iterations"]
    assert [r["iteration"] for r in log] == [1, 2] and log[1]["train_loss"] is not None
    assert all(r["top1"] is not None for r in log)
    assert (tmp_path / "p.pt").is_file()
    for name, t in out.items():
        assert torch.equal(t.dequantize(), job.state_dict[name])


def test_bad_input_is_clear() -> None:
    with pytest.raises(ConfigError, match="increasing"):
        build_config("pwfn", PWFNMethod.options, {}, ["rounds=[0.5,0.5,1.0]"])
    with pytest.raises(ConfigError, match="sigma_join"):
        build_config("pwfn", PWFNMethod.options, {}, ["sigma_join=mean"])
    method, job = job_for(small_cnn())
    with pytest.raises(DataError, match="needs data"):
        method.compress(job)


def test_pwfn_fixes_a_timm_vision_transformers_linear_layers() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    method, job = job_for(model, "start_epochs=0", "rest_epochs=0", "rounds=[0.6,1.0]")
    out = method.compress(job)
    assert "blocks.0.attn.qkv.weight" in out and "blocks.1.mlp.fc2.bias" in out
    assert "head.weight" in out and "patch_embed.proj.weight" in out
    assert "blocks.0.norm1.weight" not in out  # LayerNorm is never fixed
    model.load_state_dict(job.state_dict)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert method.extra_report()["unique_values"] < 400


def test_timm_names_are_allow_listed_when_timm_is_installed() -> None:
    pytest.importorskip("timm")
    from runtime import zoo

    spec = zoo.input_spec("timm.deit_tiny_patch16_224")
    assert spec.crop == 224 and spec.resize == 248  # timm's crop_pct 0.9
    model = zoo.build("timm.deit_tiny_patch16_224", {"num_classes": 10})
    assert model.head.out_features == 10
    with pytest.raises(Exception, match="unknown architecture"):
        zoo.build("timm.no_such_model")
