"""What a compression method is: named options, and a map from weights to compressed forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from packer.config import MethodConfig, Option
from packer.ptq.calib import CalibrationSet
from runtime.tensors import CompressedTensor


@dataclass
class CompressJob:
    """Everything a method may use. Methods never see files or coders."""

    model: torch.nn.Module  # built and loaded with the source weights
    state_dict: dict[str, torch.Tensor]
    targets: list[str]  # weight names to compress (Conv/Linear weights not set to 'none')
    config: MethodConfig
    seed: int = 0
    progress: bool = True
    data: Any = None  # data options for methods that calibrate or train
    calib: CalibrationSet | None = None  # --calib-data images (AdaRound, budgets, repair)


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    # A size budget (--target-size) sets this per-layer option, choosing among `rates`
    # (ascending); methods without one (None) cannot take a budget.
    rate_option: ClassVar[str | None] = None
    rates: ClassVar[tuple[float, ...]] = ()
    # Per-layer options that, set by the user for a layer, fix its rate (default: the knob).
    rate_settings: ClassVar[tuple[str, ...]] = ()

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        raise NotImplementedError

    # --- what post-training steps ask of a method ------------------------------------------

    def post_training(self, job: CompressJob) -> bool:
        """True when nothing is trained: data-aware repair (--calib-data) then applies."""
        return True

    def reference_model(self) -> nn.Module | None:
        """The full-precision model in the layout of the compressed weights, when compress()
        changed that layout (PQF permutes channels); None: the source model."""
        return None

    # --- the rate knob (size budgets) ------------------------------------------------------

    def knob(self, config: MethodConfig) -> str:
        """The option a size budget sets per layer under this configuration."""
        return str(self.rate_option)

    def prepare_candidates(self, job: CompressJob) -> None:
        """Anything layer_candidate() needs first (on job.model, a scratch copy)."""

    def budget_layers(self, job: CompressJob) -> list[str]:
        """Weight names whose rate a budget chooses."""
        return list(job.targets)

    def candidate_rates(self, job: CompressJob, name: str) -> list[float]:
        return list(self.rates)

    def candidate_key(self, config: MethodConfig) -> str:
        """What the candidates depend on (a cache key): by default every option."""
        return config.to_json()

    def layer_candidate(self, job: CompressJob, name: str, rate: float | None
                        ) -> CompressedTensor:
        """`name` compressed alone at `rate` (None: as configured), exactly as compress()
        would store it."""
        raise NotImplementedError


class PerTensorMethod(Method):
    """A post-training method that treats each weight on its own."""

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        out: dict[str, CompressedTensor] = {}
        bar = tqdm(job.targets, desc=self.name, unit="tensor", disable=not job.progress,
                   leave=False)
        for name in bar:
            out[name] = self.compress_tensor(name, job.state_dict[name],
                                             job.config.for_tensor(name))
        return out

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> CompressedTensor:
        raise NotImplementedError

    def layer_candidate(self, job: CompressJob, name: str, rate: float | None
                        ) -> CompressedTensor:
        opts = job.config.for_tensor(name)
        if rate is not None:
            opts = {**opts, self.knob(job.config): rate}
        return self.compress_tensor(name, job.state_dict[name], opts)
