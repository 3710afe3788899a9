"""Post-training tools on small synthetic cases: knapsack, AdaRound, repair, statistics."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from packer.methods.uniform import quantize_symmetric
from packer.ptq import knapsack
from packer.ptq.adaround import (
    AdaRoundSettings,
    LayerProblem,
    adaround_model,
    beta_at,
    initial_v,
    reconstruct,
    rectified_sigmoid,
)
from packer.ptq.graph import following_norms
from packer.ptq.repair import reestimate_bn, repair
from packer.ptq.stats import Gram, fisher_quadratics, patches, quadratic, weight_rows


def brute_force(layers, capacity):
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in layers)):
        b, d = knapsack.total(layers, choice)
        if b <= capacity and (best is None or d < best[1] - 1e-12):
            best = (choice, d)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_exact_on_small_cases(seed: int) -> None:
    rng = random.Random(seed)
    layers = [[knapsack.Option(rng.randint(1, 60), rng.random() * 10)
               for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
    capacity = rng.randint(0, 150)
    want = brute_force(layers, capacity)
    got = knapsack.solve(layers, capacity, resolution=10**6)
    if want is None:
        assert got is None
        return
    b, d = knapsack.total(layers, got)
    assert b <= capacity
    assert d == pytest.approx(want[1], abs=1e-9)


def test_knapsack_floor_and_coarse_units_stay_within_capacity() -> None:
    rng = random.Random(7)
    layers = [[knapsack.Option(rng.randint(100, 5000), 1.0 / (i + 1)) for i in range(6)]
              for _ in range(12)]
    capacity = 30_000
    choice = knapsack.solve(layers, capacity, resolution=50)  # units of 600 bytes
    assert knapsack.total(layers, choice)[0] <= capacity
    floored = knapsack.solve(layers, capacity, floor=29_000, resolution=10**6)
    assert 29_000 <= knapsack.total(layers, floored)[0] <= capacity
    assert knapsack.solve(layers, 10) is None


def test_knapsack_ties_prefer_more_bytes() -> None:
    layers = [[knapsack.Option(10, 1.0), knapsack.Option(20, 1.0)]]
    assert knapsack.solve(layers, 25, resolution=100) == [1]


def test_patches_reproduce_conv_and_linear_outputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9)
    for conv in (nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.Conv2d(6, 4, 3, groups=2,
                                                                      padding=1, bias=False),
                 nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect", bias=False)):
        rows = patches(conv, x)  # [g, positions, d]
        g = conv.groups
        w = weight_rows(conv.weight).reshape(g, 4 // g, -1)
        y = torch.bmm(rows, w.transpose(1, 2))  # [g, B*L, C/g]
        ref = (conv(x) - (conv.bias[None, :, None, None] if conv.bias is not None else 0))
        ref = ref.permute(0, 2, 3, 1).reshape(-1, g, 4 // g).transpose(0, 1)
        assert torch.allclose(y, ref, atol=1e-5)
    lin = nn.Linear(5, 3, bias=False)
    z = torch.randn(7, 5)
    assert torch.allclose(patches(lin, z)[0] @ lin.weight.t(), lin(z), atol=1e-6)


def test_gram_quadratic_equals_output_error() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(4, 3, 8, 8)
    delta = torch.randn_like(conv.weight) * 0.1
    gram = Gram.empty(1, 27)
    gram.add(patches(conv, x))
    err = nn.functional.conv2d(x, delta, padding=1)  # output error of the weight error
    want = (err ** 2).mean(dim=(0, 2, 3))  # per channel, mean over positions
    got = quadratic(weight_rows(delta), gram.mean(), 1)
    assert torch.allclose(got, want, rtol=1e-4)


def _measured_kl(model: nn.Module, layer: nn.Module, delta: torch.Tensor,
                 batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        ref = [torch.log_softmax(model(b).double(), 1) for b in batches]
        layer.weight += delta
        kl = sum(float((r.exp() * (r - torch.log_softmax(model(b).double(), 1))).sum())
                 for b, r in zip(batches, ref, strict=True))
        layer.weight -= delta
    return kl / sum(b.shape[0] for b in batches)


def test_fisher_quadratic_is_the_second_order_kl() -> None:
    torch.manual_seed(2)
    # Smooth (tanh), so the second-order expansion is exact as the error shrinks.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    batches = [torch.randn(32, 3, 6, 6) for _ in range(3)]
    small = [torch.randn_like(model[0].weight) * s for s in (0.003, 0.01)]
    lin = [torch.randn_like(model[4].weight) * 0.05]
    stats: dict[str, float] = {}
    exact = fisher_quadratics(model, {"0": small, "4": lin}, batches, stats, top=5)
    assert stats["mass_left_out"] < 1e-9  # every class of 5
    for delta, value in zip(small, exact["0"], strict=True):
        assert value == pytest.approx(_measured_kl(model, model[0], delta, batches), rel=0.02)
    assert exact["4"][0] == pytest.approx(_measured_kl(model, model[4], lin[0], batches),
                                          rel=0.02)
    # Fewer classes per image: less of the expectation, never more.
    top2 = fisher_quadratics(model, {"0": small}, batches, stats, top=2)["0"]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(top2, exact["0"], strict=True))
    assert stats["mass_left_out"] > 0


def _problem(seed: int = 3) -> tuple[LayerProblem, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    # Smooth, channel-correlated inputs (like images): with white inputs every weight's
    # error is independent and nearest rounding is already optimal.
    smooth = nn.functional.interpolate(torch.randn(16, 2, 3, 3), size=8, mode="bilinear")
    x = torch.cat([smooth, smooth + 0.3 * torch.randn(16, 2, 8, 8)], 1)
    gram = Gram.empty(1, 36)
    gram.add(patches(conv, x))
    q = quantize_symmetric(conv.weight.detach(), 3, clip="mse")
    rows = weight_rows(conv.weight.detach())
    unit = 1 / quadratic(rows, gram.mean(), 1)  # as a BatchNorm after it would weight
    problem = LayerProblem(rows, q.scales.reshape(-1, 1), 3, gram.mean(), gram.mean(),
                           gram.mean(), 1, unit)
    return problem, weight_rows(q.codes.float())


def test_adaround_lowers_error_and_keeps_grid() -> None:
    problem, nearest = _problem()
    settings = AdaRoundSettings(iters=600, lr=1e-2)
    codes, stats = reconstruct(problem, nearest, settings)
    assert stats["error_adaround"] < 0.5 * stats["error_nearest"]
    assert (codes - nearest).abs().max() <= 1  # a neighbour of nearest, on the same grid
    assert codes.abs().max() <= 3 and torch.equal(codes, codes.round())
    trace = stats["objective"]
    warm = int(settings.warmup * len(trace))
    assert trace[warm - 1] < trace[0]  # reconstruction alone goes down in the warm-up
    assert trace[-1] < max(trace[warm:])  # and the regularised objective goes down after


def test_adaround_schedule_and_init() -> None:
    s = AdaRoundSettings(iters=100)
    assert beta_at(0, s) is None and beta_at(19, s) is None
    assert beta_at(20, s) == pytest.approx(20.0) and beta_at(99, s) == pytest.approx(2.23,
                                                                                   abs=0.01)
    rest = torch.rand(1000) * 0.999
    assert torch.allclose(rectified_sigmoid(initial_v(rest)), rest, atol=1e-5)


def test_adaround_model_keeps_scales_and_bits() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    names = ["0.weight", "3.weight", "6.weight"]
    tensors = {n: quantize_symmetric(model.get_parameter(n).detach(), 3) for n in names}
    out, report = adaround_model(model, tensors, names, [torch.randn(32, 3, 8, 8)],
                                 AdaRoundSettings(iters=200), progress=False)
    assert following_norms(model) == {"0": "1"}
    for n in names:
        assert torch.equal(out[n].scales, tensors[n].scales) and out[n].bits == 3
        assert (out[n].codes - tensors[n].codes).abs().max() <= 1
    assert set(report["adaround_layers"]) == {"0", "3", "6"}


def test_bn_reestimation_matches_the_batch_statistics() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    images = torch.randn(64, 3, 5, 5) * 3 + 1
    assert reestimate_bn(model, images) == 1  # one batch of 64 (BN_BATCH is 128)
    with torch.no_grad():
        y = model[0](images).transpose(0, 1).reshape(4, -1)
    assert torch.allclose(model[1].running_mean, y.mean(1), atol=1e-5)
    assert torch.allclose(model[1].running_var, y.var(1), rtol=1e-4)  # unbiased, as torch
    assert not model.training


def test_repair_moves_stats_and_corrects_the_classifier_bias() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    batches = [torch.randn(32, 3, 6, 6) for _ in range(2)]
    with torch.no_grad():  # statistics of the full-precision network on these images
        reestimate_bn(model, torch.cat(batches))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = {n: quantize_symmetric(model.get_parameter(n).detach(), 2)
                  for n in ("0.weight", "5.weight")}
    report = repair(model, model, state, compressed, batches, ("bn", "bias"))
    assert report["bn_reestimated"] == 1
    assert not torch.equal(state["1.running_mean"], model.state_dict()["1.running_mean"])
    assert "5" in report["bias_corrected"] and "0" not in report["bias_corrected"]
    # After repair, the mean logits of the quantized model match the full-precision ones.
    quant = nn.Sequential(*[m for m in model]).eval()
    import copy
    quant = copy.deepcopy(model)
    quant.load_state_dict({**state, **{n: t.dequantize() for n, t in compressed.items()}})
    with torch.no_grad():
        fp = torch.cat([model(b) for b in batches]).mean(0)
        q = torch.cat([quant(b) for b in batches]).mean(0)
    assert torch.allclose(fp, q, atol=1e-4)


def test_uniform_rounds_to_nearest_by_default_and_rdo_on_request() -> None:
    from packer.methods.uniform import UniformMethod
    from tests.packing import method_job

    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    w = model[0].weight.detach()
    method, job = method_job(UniformMethod, model, "bits=3")
    plain = method.compress(job)["0.weight"]
    assert torch.equal(plain.codes, quantize_symmetric(w, 3).codes)
    method, job = method_job(UniformMethod, model, "bits=3", "rounding=rdo")
    assert not torch.equal(method.compress(job)["0.weight"].codes, plain.codes)
    method, job = method_job(UniformMethod, model, "rounding=adaround")
    with pytest.raises(Exception, match="needs|--calib-data"):
        method.compress(job)


def test_step_rms_grid_follows_the_channel_rms_and_sets_the_bit_width() -> None:
    torch.manual_seed(9)
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8)[:, None, None, None]
    q = quantize_symmetric(w, 5, step_rms=0.5)
    rms = w.reshape(8, -1).pow(2).mean(1).sqrt()
    assert torch.allclose(q.scales, 0.5 * rms)
    peak = int((w.reshape(8, -1).abs() / q.scales[:, None]).round().max())
    assert q.bits == peak.bit_length() + 1 and q.codes.abs().max() == peak  # no clipping
    assert ((q.dequantize() - w).abs() <= q.scales[:, None, None, None] / 2 + 1e-6).all()
    coarse = quantize_symmetric(w, 5, step_rms=2.0)
    assert coarse.bits == 2 or coarse.codes.abs().max() <= (1 << (coarse.bits - 1)) - 1
