"""PWFN's Bayesian layers: every fixable tensor becomes a mean and a learned noise scale.

Rather than swapping module classes (which breaks user models and state-dict names), each
Conv/Linear weight and bias gets a `torch.nn.utils.parametrize` parametrization: the
original parameter is the mean mu, the parametrization holds sigma, and in training mode the
layer sees mu + max(sigma, 2^-30) * eps with fresh eps ~ N(0, I) per forward (METHODS.md
2.3); in eval mode it sees mu. Removing the parametrizations leaves mu as the weight.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

SIGMA_FLOOR = 2.0 ** -30
SIGMA_CAP = 0.05  # the prior's upper clip and the regulariser's target
SIGMA_SCALE = 0.0025  # sigma at the 75th percentile of the power-of-two distance
CONSTANT_SIGMA = 1e-4  # prior=false: the reference's (overwritten) constant fill


class Gaussian(nn.Module):
    """mu -> mu + sigma * eps while training; remembers eps for the sigma regulariser."""

    def __init__(self, sigma: Tensor) -> None:
        super().__init__()
        self.sigma = nn.Parameter(sigma.clone())
        self.eps: Tensor | None = None

    def forward(self, mu: Tensor) -> Tensor:
        if not self.training:
            return mu
        eps = torch.randn_like(mu)
        self.eps = eps
        return mu + self.sigma.clamp_min(SIGMA_FLOOR) * eps


def prior_sigma(mu: Tensor) -> Tensor:
    """sigma from the relative distance to the neighbouring powers of two (METHODS.md 2.2).

    r = (|mu-u|/|mu|)(|mu-l|/|mu|) for the powers of two u >= |mu| >= l: 0 on a power of
    two, at most 1/8 between. sigma = clip(0.0025 r / Q75(r), 2^-30, 0.05). Guards the
    reference's crashes: mu = 0 gets r = 0 (it is exactly representable) instead of NaN, and
    the quantile is taken in numpy, which has no 16M-element limit.
    """
    mag = mu.detach().double().abs()
    safe = mag.clamp_min(1e-300)
    upper = torch.pow(2.0, torch.ceil(torch.log2(safe)))
    lower = torch.pow(2.0, torch.floor(torch.log2(safe)))
    r = ((upper - mag) / safe) * ((mag - lower) / safe)
    r = torch.where(mag > 0, r, torch.zeros_like(r))
    q = float(np.quantile(r.reshape(-1).numpy(), 0.75)) if r.numel() else 0.0
    if q <= 0:
        return torch.full_like(mu, SIGMA_FLOOR, dtype=torch.float32)
    return (SIGMA_SCALE * r / q).clamp(SIGMA_FLOOR, SIGMA_CAP).float()


def attach(module: nn.Module, name: str, prior: bool) -> Gaussian:
    mu = getattr(module, name)
    sigma = prior_sigma(mu) if prior else torch.full_like(mu, CONSTANT_SIGMA,
                                                           dtype=torch.float32)
    gaussian = Gaussian(sigma)
    parametrize.register_parametrization(module, name, gaussian, unsafe=True)
    return gaussian


def mean_parameter(module: nn.Module, name: str) -> nn.Parameter:
    return module.parametrizations[name].original  # type: ignore[index,return-value]


def detach_all(model: nn.Module) -> None:
    """Drop every parametrization, leaving mu as the parameter."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def sigma_gradient_hook(gaussian: Gaussian, reg: float, fixed: Callable[[], Tensor | None]
                        ) -> Callable[[Tensor], Tensor]:
    """The reference's sigma prior, injected into the gradient (it has no KL term):
    g <- g - reg * relu(0.05 - sigma) * |eps|, pushing sigma up toward 0.05 against the
    cross-entropy. `fixed()` masks entries whose sigma is frozen (zero gradient)."""

    def hook(grad: Tensor) -> Tensor:
        if reg > 0 and gaussian.eps is not None:
            push = torch.relu(SIGMA_CAP - gaussian.sigma.detach()) * gaussian.eps.abs()
            grad = grad - reg * push
        mask = fixed()
        if mask is not None:
            grad = grad.masked_fill(mask.to(grad.device), 0.0)
        return grad

    return hook
