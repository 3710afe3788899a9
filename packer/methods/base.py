"""What a compression method is: named options, and a map from weights to compressed forms."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from packer.config import MethodConfig, Option, Setting, config_from_settings
from packer.ptq.calib import CalibrationSet
from runtime.errors import ConfigError, WeightpackError
from runtime.format.records import ActivationQuantRecord, ChannelGateRecord
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
    # In a chain (packer/methods/chain.py): what the earlier stages produced, by tensor name.
    previous: dict[str, CompressedTensor] = field(default_factory=dict)
    # Filled by methods whose model quantizes activations at inference (dorefa bits_a).
    activation_quant: list[ActivationQuantRecord] = field(default_factory=list)
    # Filled by methods whose model gates channels at inference (fbs).
    channel_gates: list[ChannelGateRecord] = field(default_factory=list)
    # In a chain: the settings of the stages before this one, which made the model it gets.
    upstream: list[dict[str, Any]] = field(default_factory=list)

    def replace_model(self, model: torch.nn.Module, added_targets: Iterable[str] = ()) -> None:
        """Hand the job a model whose structure a stage changed (fbs adds gate predictors).

        Every tensor of the old model must still be in the new one, under its name. The new
        model's tensors replace `state_dict`'s values and its new ones join it (in place: the
        packer stores what `state_dict` holds), and `added_targets` (new weights that later
        stages should compress, like any other layer's) join `targets`. Later stages and the
        packer see only the new model."""
        state = model.state_dict()
        lost = [name for name in self.state_dict if name not in state]
        if lost:
            raise WeightpackError(f"internal error: the new model lacks {lost[0]!r}")
        for name, value in state.items():
            self.state_dict[name] = value.detach().clone()
        unknown = [name for name in added_targets if name not in state]
        if unknown:
            raise WeightpackError(f"internal error: {unknown[0]!r} is not in the new model")
        self.targets.extend(n for n in added_targets if n not in self.targets)
        self.model = model

    def settings(self) -> dict[str, Any]:
        """What decides this job's result, for resume checkpoints: the method, its options
        (not where checkpoints go or whether to resume), per-layer settings and the seed, and
        in a chain the earlier stages' settings (`after`): a stage that fine-tunes after
        `fbs` at ratio 0.7 must not resume the state it left after `fbs` at 0.5."""
        options = {k: v for k, v in self.config.options.items() if k not in RUN_ONLY_OPTIONS}
        out = {"method": self.config.method, "options": options,
               "layers": self.config.layers, "seed": self.seed}
        if self.upstream:
            out["after"] = list(self.upstream)
        return out

    def take_model_state(self) -> None:
        """Copy the model's current values into `state_dict`. The packer stores every tensor
        a method does not return from there, so a method that trained or permuted BatchNorm,
        biases or uncompressed layers hands their new values over this way."""
        final = self.model.state_dict()
        for key in self.state_dict:
            self.state_dict[key] = final[key].detach().clone()


RUN_ONLY_OPTIONS = ("checkpoint", "resume")
"""Method options that say where a run keeps its state, not what it computes."""


def refuse_torchscript(model: nn.Module, method: str, needs: str) -> None:
    """A method that rewires or trains the model's layers (`needs`: what it does to them)
    cannot work on a TorchScript module, whose submodules are compiled away."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(f"{method} {needs}, which a TorchScript model does not expose; pack "
                          "its state_dict with a zoo architecture (--arch)")


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
    trains: ClassVar[bool] = False  # takes training data (--cifar10/--imagenet/--data)
    # Position in a chain (packer/methods/chain.py RANK_NAMES): 0 structure, 1 sparsity,
    # 2 weight representation, 3 grid snapping; None: the method is never a chain stage.
    chain_rank: ClassVar[int | None] = None
    # True for a stage that changes the model's structure (CompressJob.replace_model).
    changes_model: ClassVar[bool] = False
    # True when the method works on whatever model and targets it is given, including one
    # an earlier stage changed (fbs: gated convs, predictor weights among the targets); a
    # chain puts no other method after a stage that changes the model.
    takes_changed_model: ClassVar[bool] = False

    def build_config(self, settings: list[Setting]) -> MethodConfig:
        """This method's options from the user's settings (a chain splits them by stage)."""
        return config_from_settings(self.name, self.options, settings)

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}  # filled by `compress`

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        """What the packer adds to its JSON report after `compress` (per-layer notes, logs)."""
        return dict(self.report)

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        raise NotImplementedError

    def required_features(self, config: MethodConfig) -> frozenset[str]:
        """Runtime features (runtime.format.features) the packed file will require with
        this config; the packer checks before any work that the model can carry them."""
        return frozenset()

    # --- what post-training steps ask of a method ------------------------------------------

    def post_training(self, job: CompressJob) -> bool:
        """True when nothing is trained under this job's options: data-aware repair
        (--calib-data) then applies. Methods that train only for some options say so."""
        return not self.trains

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

    def added_tensors(self, model: torch.nn.Module, config: MethodConfig) -> list[str]:
        """Names of the tensors `compress` will add to the model (a stage that changes it,
        CompressJob.replace_model), known before any work, so per-layer settings may name
        them (`*.gate.method=none`)."""
        return []


class PerTensorMethod(Method):
    """A post-training method that treats each weight on its own."""

    takes_changed_model = True  # it reads job.state_dict[name] for each target, nothing else

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
