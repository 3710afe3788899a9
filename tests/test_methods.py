"""Post-training methods: the grids and codebooks they produce, on synthetic weights."""

from __future__ import annotations

import pytest
import torch

from packer.config import build_config
from packer.methods import METHODS
from packer.methods.kmeans import assign_nearest, kmeans_share, lloyd_1d
from packer.methods.none import raw_tensor
from packer.methods.uniform import quantize_symmetric
from runtime.tensors import ScalarCodebookTensor, UniformTensor


def weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_int8_is_symmetric_per_channel_with_tensorrt_range() -> None:
    w = weights(32, 16, 3, 3)
    q = quantize_symmetric(w, 8, per_channel=True, clip="max")
    assert isinstance(q, UniformTensor) and q.zero_points is None and q.axis == 0
    assert q.codes.min() >= -127 and q.codes.max() <= 127
    peak = w.reshape(32, -1).abs().amax(1)
    assert torch.allclose(q.scales, peak / 127)
    # Each channel's largest weight maps onto +-127 and the error is at most half a step.
    assert torch.equal(q.codes.reshape(32, -1).abs().amax(1), torch.full((32,), 127))
    err = (q.dequantize() - w).reshape(32, -1).abs().amax(1)
    assert torch.all(err <= q.scales / 2 + 1e-7)


def test_mse_clipping_never_has_more_error_than_max() -> None:
    w = weights(64, 9)
    w[0, 0] = 2.0  # an outlier that max-scaling would spend the whole grid on
    for bits in (3, 4, 5):
        mse = quantize_symmetric(w, bits, clip="mse").dequantize()
        mx = quantize_symmetric(w, bits, clip="max").dequantize()
        assert ((mse - w) ** 2).sum(1).le(((mx - w) ** 2).sum(1) + 1e-9).all()


def test_per_layer_uniform_has_one_scale_and_fixed_step_sets_bits() -> None:
    w = weights(8, 8)
    q = quantize_symmetric(w, 5, per_channel=False, clip="max")
    assert q.axis is None and q.scales.shape == (1,)
    step = quantize_symmetric(w, 5, per_channel=False, step=0.01)
    assert torch.all(step.scales == 0.01)
    peak = int(torch.round(w.abs().max() / 0.01))
    assert (1 << (step.bits - 1)) - 1 >= peak and (1 << (step.bits - 2)) - 1 < peak


def test_all_zero_channel_does_not_divide_by_zero() -> None:
    w = weights(4, 9)
    w[2] = 0
    q = quantize_symmetric(w, 5, clip="mse")
    assert torch.isfinite(q.scales).all() and torch.equal(q.dequantize()[2], torch.zeros(9))


def test_nearest_assignment_matches_brute_force() -> None:
    values = weights(5000).reshape(-1)
    centroids = torch.sort(weights(17, seed=3).reshape(-1)).values
    brute = (values[:, None] - centroids[None, :]).abs().argmin(1)
    assert torch.equal(assign_nearest(values, centroids), brute)


def test_lloyd_reduces_error_and_is_deterministic() -> None:
    values = weights(20000).reshape(-1)
    c0, i0 = lloyd_1d(values, 16, 0)
    c30, i30 = lloyd_1d(values, 16, 30)
    assert ((c30[i30] - values) ** 2).sum() < ((c0[i0] - values) ** 2).sum()
    c30b, i30b = lloyd_1d(values, 16, 30)
    assert torch.equal(c30, c30b) and torch.equal(i30, i30b)


def test_kmeans_keeps_exact_zeros_and_k() -> None:
    w = weights(64, 32, 3, 3)
    w[w.abs() < 0.05] = 0  # about 38% pruned
    q = kmeans_share(w, 32, 30)
    assert isinstance(q, ScalarCodebookTensor) and q.codebook.numel() == 32
    assert q.codebook[0] == 0
    dense = q.dequantize()
    assert torch.equal(dense == 0, w == 0)  # every pruned weight stays 0, no other becomes 0
    assert torch.unique(dense).numel() <= 32


def test_kmeans_with_fewer_distinct_values_than_k() -> None:
    w = torch.tensor([[0.5, -0.5, 0.5, 0.25]])
    q = kmeans_share(w, 32, 30)
    assert q.codebook.numel() == 3 and torch.equal(q.dequantize(), w)


def test_fp16_raw_keeps_dtype_on_decode() -> None:
    w = weights(4, 4)
    r = raw_tensor(w, fp16=True)
    assert r.values.dtype == torch.float16 and r.dequantize().dtype == torch.float32
    assert raw_tensor(torch.tensor(3), fp16=True).values.dtype == torch.int64


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_documented_options(name: str) -> None:
    method = METHODS[name]
    assert method.summary
    for key, opt in method.options.items():
        assert opt.help, f"{name}.{key} has no help"
    config = build_config(name, method.options, {}, [])
    assert set(method.options) <= set(config.options)


def test_rdo_rounding_lowers_entropy_and_stays_within_one_step() -> None:
    from runtime.coders import entropy_bits

    w = weights(64, 64, 3, 3)
    plain = quantize_symmetric(w, 4, clip="max")
    rdo = quantize_symmetric(w, 4, clip="max", rdo=0.3)
    h = [entropy_bits((q.codes + 7).reshape(-1).numpy(), 16) for q in (plain, rdo)]
    assert h[1] < h[0]
    assert ((rdo.dequantize() - w).abs() <= plain.scales[:, None, None, None] + 1e-7).all()
    assert rdo.codes.abs().max() <= 7
