"""Chained methods, `--method a+b+c`: each stage consumes the model the previous one left.

The one chaining mechanism of the packer. A chain is valid when every stage can be chained
(`Method.chain_rank` is set) and the ranks strictly increase: structure (dynamic gating)
before sparsity (pruning) before a weight representation (k-means, uniform, PQF, ...) before
grid snapping (int8). So `prune+kmeans+int8` is a chain and `int8+kmeans` is not.

Options of all stages share one `--set` namespace: a plain `KEY=VALUE` goes to every stage
that has the option (`finetune_epochs` reaches both `prune` and `kmeans`), `STAGE:KEY=VALUE`
to that stage only (`kmeans:finetune_epochs=0`), and `GLOB.KEY=VALUE` works as for a single
method. Between stages the model's compressed weights are replaced by their dequantized
values, and the next stage sees what the earlier ones produced in `CompressJob.previous`
(k-means after pruning keeps the zeros as their own cluster; int8 snaps a codebook).

A stage may change the model itself (`Method.changes_model`: fbs installs channel gates and
their predictors) through `CompressJob.replace_model`: later stages then get the new model,
and the predictor weights among their targets, so `fbs+kmeans` clusters them like any other
layer. Only methods that take such a model (`Method.takes_changed_model`, the per-tensor
methods) may follow. Per-layer settings may name the tensors such a stage will add
(`Method.added_tensors`, known before any work: `*.gate.method=none`). The file then needs
every stage's runtime features.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from packer.config import (
    COMMON_OPTIONS,
    MethodConfig,
    Option,
    Setting,
    config_from_settings,
)
from packer.methods.base import CompressJob, Method
from runtime.errors import ConfigError
from runtime.tensors import CompressedTensor

SEPARATOR = "+"
RANK_NAMES = {0: "structure", 1: "sparsity", 2: "weight representation", 3: "grid snapping"}
"""What each `chain_rank` means, in the order stages must come."""


def split_chain(name: str) -> list[str]:
    """The stage names of `name` ("prune+kmeans" -> ["prune", "kmeans"])."""
    return [part.strip() for part in name.split(SEPARATOR)]


def validate_chain(name: str, stages: list[type[Method]]) -> None:
    """Every stage chainable, ranks strictly increasing, and after a stage that changes the
    model only stages that take a changed model: one clear error otherwise."""
    for stage in stages:
        if stage.chain_rank is None:
            raise ConfigError(f"method {stage.name!r} cannot be part of a chain ({name!r})")
    for before, after in zip(stages, stages[1:], strict=False):
        if after.chain_rank == before.chain_rank:  # type: ignore[operator]
            raise ConfigError(
                f"impossible chain {name!r}: {before.name} and {after.name} are both a "
                f"{RANK_NAMES[before.chain_rank]} stage; a chain has at most one of each")
        if after.chain_rank < before.chain_rank:  # type: ignore[operator]
            raise ConfigError(
                f"impossible chain order {name!r}: {after.name} "
                f"({RANK_NAMES[after.chain_rank]}) must come before {before.name} "
                f"({RANK_NAMES[before.chain_rank]}); stages go "
                + " -> ".join(RANK_NAMES.values()))
    for i, stage in enumerate(stages):
        changer = next((s for s in stages[:i] if s.changes_model), None)
        if changer is not None and not stage.takes_changed_model:
            raise ConfigError(
                f"impossible chain {name!r}: {stage.name} cannot follow {changer.name}, which "
                f"changes the model's structure; methods that can: "
                f"{', '.join(_takers()) or 'none'}")


def _takers() -> list[str]:
    from packer.methods import METHODS  # the registry imports this module

    return [n for n, m in METHODS.items() if m.takes_changed_model and m.chain_rank is not None]


def stage_settings(chain: str, stage: type[Method], all_stages: list[type[Method]],
                   settings: Iterable[Setting]) -> list[Setting]:
    """The settings one stage receives from the chain's shared namespace."""
    names = {s.name for s in all_stages}
    mine: list[Setting] = []
    for glob, key, value in settings:
        target, sep, option = key.partition(":")
        if sep:
            if target not in names:
                raise ConfigError(f"{key!r}: {target!r} is not a stage of {chain!r}")
            if target == stage.name:
                mine.append((glob, option, value))
            continue
        if key in COMMON_OPTIONS or key in stage.options:
            mine.append((glob, key, value))
        elif not any(key in s.options for s in all_stages):
            known = sorted({*COMMON_OPTIONS, *(k for s in all_stages for k in s.options)})
            raise ConfigError(f"unknown option {key!r} for method {chain}; known: "
                              f"{', '.join(known)}")
    return mine


class ChainMethod(Method):
    """Runs its stages in order on one job; the last word on each tensor wins."""

    name: ClassVar[str] = "chain"
    summary: ClassVar[str] = "stages run in order (a+b+c)"

    def __init__(self, name: str, stages: list[type[Method]]) -> None:
        validate_chain(name, stages)
        self.chain_name = name
        self.stages = [stage() for stage in stages]
        merged: dict[str, Option] = {}
        for stage in stages:
            for key, opt in stage.options.items():
                merged.setdefault(key, opt)
        self.options = merged  # type: ignore[misc]  # the shared namespace, for listings
        self.trains = any(stage.trains for stage in stages)  # type: ignore[misc]

    def build_config(self, settings: list[Setting]) -> MethodConfig:
        classes = [type(s) for s in self.stages]
        configs = [config_from_settings(s.name, s.options,
                                        stage_settings(self.chain_name, type(s), classes,
                                                       settings), owner=self.chain_name)
                   for s in self.stages]
        merged = {k: v for c in configs for k, v in c.options.items()}
        # Layer globs of the common options (method=none, fp16, coder) are the same in every
        # stage, so the first stage's list serves the packer's per-tensor questions.
        return MethodConfig(self.chain_name, merged, configs[0].layers, stages=configs)

    def required_features(self, config: MethodConfig) -> frozenset[str]:
        return frozenset().union(*(stage.required_features(c)
                                   for stage, c in zip(self.stages, config.stages, strict=True)))

    def added_tensors(self, model: torch.nn.Module, config: MethodConfig) -> list[str]:
        return [name for stage, c in zip(self.stages, config.stages, strict=True)
                for name in stage.added_tensors(model, c)]

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        chain_config = job.config
        produced: dict[str, CompressedTensor] = {}
        upstream: list[dict[str, Any]] = []
        try:
            for i, (stage, config) in enumerate(zip(self.stages, chain_config.stages,
                                                    strict=True)):
                job.config, job.previous, job.upstream = config, dict(produced), list(upstream)
                produced.update(stage.compress(job))
                upstream.append(job.settings())
                if i + 1 < len(self.stages):
                    _load_dequantized(job, produced)
        finally:
            job.config, job.upstream = chain_config, []
        return produced

    def extra_report(self, job: CompressJob) -> dict[str, Any]:
        report: dict[str, Any] = {}
        chain_config = job.config
        try:
            for stage, config in zip(self.stages, chain_config.stages, strict=True):
                extra = getattr(stage, "extra_report", None)
                if callable(extra):
                    job.config = config
                    report.update(extra(job))
        finally:
            job.config = chain_config
        return report


def _load_dequantized(job: CompressJob, produced: dict[str, CompressedTensor]) -> None:
    """Put the stage's result into the job's weights (and the model's, where a tensor of
    that name is still in it), so the next stage starts from what this one left."""
    with torch.no_grad():
        in_model = job.model.state_dict()
        for name, tensor in produced.items():
            value = tensor.dequantize()
            if name in in_model and in_model[name].shape == value.shape:
                in_model[name].copy_(value.to(in_model[name].dtype))
            if name in job.state_dict:
                job.state_dict[name] = value.to(job.state_dict[name].dtype)
