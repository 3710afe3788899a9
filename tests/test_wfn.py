"""WFN: power-of-two centres, the greedy fixing step, the regulariser, frozen fixed weights,
the iterative method end to end (post-training and with training), resume, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from packer.compress import PackRequest, compressible_weights, pack
from packer.config import build_config
from packer.methods import METHODS, CompressJob
from packer.methods.weightfix import WFNMethod
from packer.methods.weightfix.centres import nearest, round_pow2, wfn_candidates
from packer.methods.weightfix.fixed import FixedParams, value_stats
from packer.methods.weightfix.greedy import acceptance_distance, accepted_prefix, fix_step
from packer.methods.weightfix.regulariser import TEMPERATURE, cluster_distance
from packer.training import DataSpec
from runtime import load
from runtime.errors import ConfigError, DataError, WeightpackError
from runtime.tensors import ScalarCodebookTensor
from runtime.zoo.cifar_resnet import cifar_resnet20
from tests.ddp import run_two_ranks
from tests.packing import method_job

torch.set_num_threads(1)
Z = 2.0 ** -7


def power_terms(v: float) -> int:
    """The fewest signed powers of two that sum to v (weight of the non-adjacent form)."""
    if v == 0:
        return 0
    m, e = math.frexp(abs(v))
    n = int(m * 2**53)  # exact integer mantissa
    terms = 0
    while n:
        if n & 1:
            terms += 1
            n -= 2 - (n & 3)  # digit +1 or -1, leaving a multiple of 4 when possible
        n >>= 1
    return terms


def job_for(model: nn.Module, *sets: str, data=None) -> tuple[WFNMethod, CompressJob]:
    return method_job(WFNMethod, model, *sets, data=data)


# --- centres --------------------------------------------------------------------------------


def test_order_zero_candidates_are_zero_and_signed_powers_of_two() -> None:
    c = wfn_candidates(0.9, 0.05, 0, Z)
    assert torch.equal(c, torch.sort(c).values) and 0.0 in c.tolist()
    assert torch.equal(c, -c.flip(0))
    for v in c.tolist():
        assert v == 0 or (math.log2(abs(v)).is_integer() and abs(v) >= Z)
    assert max(c.tolist()) in (0.5, 1.0)


def test_higher_orders_add_sums_of_powers_of_two() -> None:
    c0, c1, c2 = (set(wfn_candidates(1.0, 0.02, p, Z).tolist()) for p in (0, 1, 2))
    assert len(c1) > len(c0) and len(c2) > len(c1)
    assert max(power_terms(v) for v in c1) == 2 and max(power_terms(v) for v in c2) <= 3
    assert all(torch.tensor(v, dtype=torch.float32).item() == v for v in c2)  # exact fp32


def test_round_pow2_zeroes_small_values_and_rounds_in_log_domain() -> None:
    x = torch.tensor([0.001, -0.3, 0.70, 0.72, 0.0], dtype=torch.float64)
    out = round_pow2(x, Z, -8, zero_small=True)
    assert out.tolist() == [0.0, -0.25, 0.5, 1.0, 0.0]  # the log midpoint is 2^-0.5 = 0.707
    assert round_pow2(torch.tensor([0.001], dtype=torch.float64), Z, -8, False).item() \
        == 2.0 ** -8  # residuals are not zeroed, only floored


def test_nearest_matches_argmin() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, generator=g, dtype=torch.float64) * 0.2
    c = wfn_candidates(1.0, 0.05, 1, Z)
    want = (w[:, None] - c[None]).abs().argmin(1)
    got = nearest(w, c)
    assert torch.equal((w - c[got]).abs(), (w - c[want]).abs())


# --- the greedy step ------------------------------------------------------------------------


def test_accepted_prefix_uses_the_running_mean_and_ignores_leading_zeros() -> None:
    d = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.9])
    # non-zero running means: 0.1, 0.15, 0.2, 0.375
    assert accepted_prefix(d, 0.25) == 6 and accepted_prefix(d, 0.14) == 4
    assert accepted_prefix(torch.tensor([0.5]), 0.1) == 0


def test_relative_distance_and_the_zero_rule() -> None:
    w = torch.tensor([0.5, -0.26, 0.001, 0.0], dtype=torch.float64)
    d = acceptance_distance(w, 0.25, True, Z)
    assert d[0] == pytest.approx(0.5) and d[3] == 1.0  # 0/0 counts as 1
    assert acceptance_distance(w, 0.0, True, Z)[2] == 0.0  # below gamma0: free for 0


def test_fix_step_reaches_the_target_and_keeps_fixed_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20_000, generator=g) * 0.05
    fixed = torch.zeros_like(w, dtype=torch.bool)
    values = w
    for t, p in enumerate([0.3, 0.6, 0.9, 1.0]):
        res = fix_step(values, fixed, p, 0.01 * (4 - t), True, Z)
        assert int(res.fixed.sum()) == int(p * w.numel() + 1e-9)
        assert torch.equal(res.values[fixed], values[fixed])  # already fixed: untouched
        assert bool((res.fixed | ~fixed).all())
        new = res.fixed & ~fixed
        assert all(power_terms(v) <= 22 for v in torch.unique(res.values[new]).tolist())
        values, fixed = res.values, res.fixed
    levels = torch.unique(values)
    assert levels.numel() < 200
    assert max(power_terms(v) for v in levels.tolist()) <= 3 or levels.numel() < 200
    # most weights sit within a few percent of where they started
    rel = ((values - w).abs() / w.abs().clamp_min(Z))
    assert float(rel.median()) < 0.05


# --- regulariser ----------------------------------------------------------------------------


def brute_force_r(w: torch.Tensor, centres: torch.Tensor, relative: bool) -> torch.Tensor:
    dist = (w[:, None] - centres[None]).abs()
    if relative:
        mag = w.detach().abs()[:, None]
        dist = torch.where(mag > Z, dist / mag, dist)
    dist = torch.where((w.abs() <= Z)[:, None] & (centres[None] == 0), 0.0, dist)
    pi = torch.softmax(-(dist + 1e-14) / TEMPERATURE, dim=1)
    return (pi * dist).sum(1).mean()


@pytest.mark.parametrize("relative", [True, False])
def test_chunked_regulariser_matches_the_full_matrix(relative: bool, monkeypatch) -> None:
    import packer.methods.weightfix.regulariser as reg

    monkeypatch.setattr(reg, "CHUNK", 700)  # several chunks
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3000, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    centres = wfn_candidates(0.5, 0.02, 1, Z)
    r = cluster_distance(w, centres, relative, Z)
    want = brute_force_r(w_ref, centres, relative)
    assert float(r.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    r.backward()
    want.backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-7, atol=1e-12)


def test_regulariser_pulls_toward_the_nearest_centre() -> None:
    w = torch.tensor([0.26, 0.24, 0.55], requires_grad=True)
    centres = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])
    cluster_distance(w, centres, False, Z).backward()
    assert w.grad[0] > 0 and w.grad[1] < 0 and w.grad[2] > 0  # descent moves each to it
    on = torch.tensor([0.25, -0.5], requires_grad=True)
    assert float(cluster_distance(on, centres, True, Z).detach()) < 1e-4  # soft, not 0


# --- fixed parameters -----------------------------------------------------------------------


def test_fixed_entries_get_no_update_even_with_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    fixed = FixedParams(model, ["0.weight", "0.bias", "2.weight"])
    flat = fixed.flat_values()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[::2] = True
    values = torch.where(mask, torch.full_like(flat, 0.125), flat)
    fixed.set_fixed(values, mask)
    fixed.freeze_fixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().sum().backward()
        assert float(model[0].weight.grad.reshape(-1)[mask[:24]].abs().sum()) == 0.0
        opt.step()
        fixed.project()
    fixed.release()
    after = fixed.flat_values()
    assert torch.equal(after[mask], values[mask])
    assert not torch.equal(after[~mask], flat[~mask])


def test_compressed_tensors_are_exact_with_fp16_codebooks() -> None:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25, 0.0, 0.375]] * 3))
        model.bias.copy_(torch.tensor([1e-9, 0.0, 2.0]))
    out = FixedParams(model, ["weight", "bias"]).compressed()
    w = out["weight"]
    assert isinstance(w, ScalarCodebookTensor) and w.codebook.dtype == torch.float16
    assert torch.equal(w.dequantize(), model.weight.detach())
    assert out["bias"].codebook.dtype == torch.float32  # 1e-9 is not exact in fp16
    assert torch.equal(out["bias"].dequantize(), model.bias.detach())


def test_value_stats_both_conventions() -> None:
    s = value_stats(torch.tensor([0.0, 0.0, 0.5, 0.5, 0.25, -0.25, 0.0, 0.0]))
    assert s["unique_values"] == 4 and s["unique_values_nonzero"] == 3
    assert s["entropy_bits"] == pytest.approx(1.75) and s["entropy_bits_nonzero"] == 1.5


# --- the method -----------------------------------------------------------------------------


def test_post_training_wfn_on_resnet20_writes_exact_power_of_two_weights(
        tmp_path: Path, shared_dir: Path) -> None:
    src = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path / "w.fb"
    sets = ["fixing_epochs=0", "distance_allowed=0.015"]
    report = pack(PackRequest(src, out, method="wfn", progress=False, overrides=sets))
    assert report["file_bytes"] == out.stat().st_size
    assert report["unique_values"] == report["centres"] < 150
    assert report["unique_values_nonzero"] == report["unique_values"] - 1
    assert report["entropy_bits_nonzero"] > 0 and 0 < report["entropy_bits"] < 6
    assert len(report["wfn_iterations"]) == 10
    assert [r["fixed_fraction"] for r in report["wfn_iterations"]][-1] == 1.0
    assert report["bits_per_weight"] < report["entropy_bits"] + 0.6
    assert set(report["int8_exact_layers"]) == set(compressible_weights(cifar_resnet20()))
    state = load(out).state_dict()
    centres = set()
    for name in compressible_weights(cifar_resnet20()):
        centres |= set(torch.unique(state[name]).tolist())
    assert len(centres) == report["centres"]
    assert all(power_terms(v) <= 12 for v in centres)
    assert sum(power_terms(v) <= 2 for v in centres) > len(centres) // 3
    again = tmp_path / "again.fb"
    pack(PackRequest(src, again, method="wfn", progress=False, overrides=sets))
    assert again.read_bytes() == out.read_bytes()


def test_training_between_fixing_steps_and_resume(tmp_path: Path) -> None:
    from tests.test_training import make_cifar_folder

    data = DataSpec("cifar10", make_cifar_folder(tmp_path / "c10"), batch_size=10, workers=0)
    ckpt = tmp_path / "wfn.pt"
    sets = ["fixing_epochs=1", "percentages=[0.5,0.9,1.0]", f"checkpoint={ckpt}",
            "optimizer=sgd", "lr=0.01"]
    torch.manual_seed(0)
    model = cifar_resnet20()
    bn_before = model.bn1.weight.detach().clone()
    method, job = job_for(model, *sets, data=data)
    out = method.compress(job)
    log = method.extra_report()["wfn_iterations"]
    assert [r["iteration"] for r in log] == [1, 2, 3] and ckpt.is_file()
    assert log[0]["train_loss"] is None and log[1]["train_loss"] is not None
    assert all(r["top1"] is not None for r in log)
    assert not torch.equal(job.state_dict["bn1.weight"], bn_before)  # BN trained
    for name, t in out.items():
        assert torch.equal(t.dequantize(), job.state_dict[name])
    # Resuming from the last iteration checkpoint redoes nothing and gives the same weights.
    method2, job2 = job_for(cifar_resnet20(), *sets, "resume=true", data=data)
    out2 = method2.compress(job2)
    assert all(torch.equal(out2[k].dequantize(), out[k].dequantize()) for k in out)
    assert method2.extra_report()["wfn_iterations"] == log
    with pytest.raises(ConfigError, match="another"):
        method3, job3 = job_for(cifar_resnet20(), *sets[:-1], "lr=0.02", "resume=true",
                                data=data)
        method3.compress(job3)
    with pytest.raises(ConfigError, match="not found"):
        m4, j4 = job_for(cifar_resnet20(), "fixing_epochs=0", "resume=true",
                         f"checkpoint={tmp_path / 'missing.pt'}")
        m4.compress(j4)


@pytest.mark.parametrize("setting, message", [
    ("distance_allowed=0", "distance_allowed"),
    ("distance_allowed=1.0", "distance_allowed"),
    ("percentages=[0.5,0.4,1.0]", "increasing"),
    ("percentages=[0.3,0.9]", "end at 1.0"),
    ("percentages=[0.3,x]", "list of numbers"),
])
def test_bad_options_are_clear(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("wfn", WFNMethod.options, {}, [setting])


def test_training_needs_data_and_a_model_needs_layers() -> None:
    method, job = job_for(cifar_resnet20())
    with pytest.raises(DataError, match="fixing_epochs=0"):
        method.compress(job)
    bn_only = nn.Sequential(nn.BatchNorm1d(3))
    method, job = job_for(bn_only, "fixing_epochs=0")
    with pytest.raises(ConfigError, match="no Conv or Linear"):
        method.compress(job)
    assert METHODS["wfn"] is WFNMethod


def test_cli_rejects_bad_delta_in_one_line(tmp_path: Path, shared_dir: Path) -> None:
    src = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    with pytest.raises(WeightpackError, match="distance_allowed"):
        pack(PackRequest(src, tmp_path / "x.fb", method="wfn", progress=False,
                         overrides=["distance_allowed=-0.1"]))
    assert not (tmp_path / "x.fb").exists()


def _ddp_worker(rank: int, out: str, data_root: str) -> None:
    from tests.test_pwfn import job_for as pwfn_job, small_cnn

    data = DataSpec("cifar10", Path(data_root), batch_size=5, workers=0)
    results = {}
    method, job = job_for(small_cnn(), "fixing_epochs=1", "percentages=[0.5,1.0]",
                          f"checkpoint={out}/wfn.pt", data=data)
    results["wfn"] = {k: t.dequantize() for k, t in method.compress(job).items()}
    method, job = pwfn_job(small_cnn(), "rest_epochs=1", "rounds=[0.5,1.0]", data=data)
    results["pwfn"] = {k: t.dequantize() for k, t in method.compress(job).items()}
    torch.save(results, f"{out}/rank{rank}.pt")


def test_two_process_ddp_fixes_identically_on_both_ranks(tmp_path: Path) -> None:
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path)
    for method in ("wfn", "pwfn"):
        assert set(r0[method]) == set(r1[method])
        for k in r0[method]:
            assert torch.equal(r0[method][k], r1[method][k]), (method, k)
    assert (tmp_path / "wfn.pt").is_file()
