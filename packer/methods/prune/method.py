"""`prune`: unstructured pruning by magnitude, SNIP or ECS, then fine-tuning with the mask held.

Pipeline: decide which layers are pruned (every Conv/Linear target; the first conv and the last
layer unless excluded) and each one's density -> score the weights by the criterion (SNIP and
ECS on training batches, at the trained or re-initialised weights) -> keep the best by density,
over one global pool (default) or per layer -> fine-tune through the shared training loop with
the mask enforced at every step -> the pruned weights, exact zeros.

The mask lives on each module as torch.nn.utils.prune's reparametrisation (weight =
weight_orig * weight_mask), so the forward pass and the gradient of every pruned weight are
zero, and `after_step` re-zeroes weight_orig after each optimizer step: nothing regrows (the
reference re-zeroed once an epoch, letting weights regrow in between). The mask is a buffer, so
a resumed checkpoint restores it.

Standalone, `prune` returns each weight raw (fp32, or fp16 with fp16=true): pruning decides
sparsity, not a representation, and any codebook or grid would lose precision the user did not
ask to lose; the packer's coders turn the zeros into bytes (`runs`, `zstd`). Chained
(`prune+kmeans`, `prune+uniform`, ...), the next stage represents the pruned weights and keeps
the zeros exact.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader

from packer.config import MethodConfig, Option
from packer.methods.base import CompressJob, Method
from packer.methods.none import raw_tensor
from packer.methods.prune.criteria import ecs_keep, keep_top
from packer.methods.stage_finetune import (
    finetune_epochs,
    finetune_options,
    run_finetune,
    teacher_of,
)
from packer.training import (
    DataSpec,
    TrainConfig,
    TrainHooks,
    build_datasets,
    fit,
    training_data,
)
from runtime.data import ShardSampler, collate_skipping
from runtime.distributed import local_device
from runtime.errors import ConfigError, DataError
from runtime.tensors import CompressedTensor

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DEFAULT_EPOCHS_WITH_DATA = 3
DENSITY_KEYS = ("density", "retain")
REFERENCE_WARMUP_LR = 0.1  # ECS.py trains the re-initialised model with SGD at 0.1


def _density_ok(d: float | None) -> str | None:
    return None if d is None or 0 < d <= 1 else f"must be in (0, 1], not {d}"


def _count_ok(lo: int, hi: int, what: str):
    return lambda v: None if lo <= v <= hi else f"{what} must be between {lo} and {hi}"


class PruneMethod(Method):
    name = "prune"
    chain_rank = 1
    trains = True  # scores (SNIP, ECS) and fine-tunes on --cifar10/--imagenet/--data
    summary = "unstructured pruning (magnitude, SNIP or ECS), fine-tuned with the mask held"
    options = {
        "criterion": Option("magnitude", "magnitude |w|, snip |g*w|, or ecs (|w| or |g|)", str,
                            choices=("magnitude", "snip", "ecs"), per_layer=False),
        "density": Option(0.2, "fraction of weights kept, in (0, 1]; GLOB.density=D sets a "
                          "layer's own", float, check=_density_ok),
        "retain": Option(None, "the reference's name for density (--retain 0.05); wins over "
                         "density when set", float, check=_density_ok),
        "scope": Option("global", "global: one ranking over every pruned layer (layers with "
                        "their own GLOB.density keep it); layerwise: each layer keeps its "
                        "density", str, choices=("global", "layerwise"), per_layer=False),
        "prune_first": Option(True, "prune the first conv (the reference does)", bool,
                              per_layer=False),
        "prune_last": Option(True, "prune the last layer (the reference does)", bool,
                             per_layer=False),
        "score_init": Option("trained", "weights snip/ecs score at: the trained ones, or "
                             "re-initialised as the reference (kaiming: SNIP baseline.py, "
                             "xavier: Snip.py)", str, choices=("trained", "kaiming", "xavier"),
                             per_layer=False),
        "score_batches": Option(1, "training batches whose summed gradient scores snip (and "
                                "ecs with ecs_warmup_epochs=0); the reference uses 1", int,
                                check=_count_ok(1, 10_000, "score_batches"), per_layer=False),
        "ecs_warmup_epochs": Option(1, "ecs: epochs of SGD before taking |w| and the last "
                                    "batch's |g| (the reference's 1); 0: gradient on the model "
                                    "as it is", int, check=_count_ok(0, 1000,
                                                                     "ecs_warmup_epochs"),
                                    per_layer=False),
        "ecs_threshold": Option("exact", "exact: keep exactly density; reference: both "
                                "thresholds at the (1-density) percentile (keeps density to "
                                "2x density)", str, choices=("exact", "reference"),
                                per_layer=False),
        "warmup_lr": Option(None, "ecs warm-up SGD learning rate (default: 0.1 as the "
                            "reference for re-initialised weights, lr for trained ones)", float,
                            check=lambda v: None if v is None or v > 0 else "must be > 0",
                            per_layer=False),
        **finetune_options(DEFAULT_EPOCHS_WITH_DATA, lr=0.01, optimizer="sgd",
                           weight_decay=5e-4),
    }

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def extra_report(self, job: CompressJob | None = None) -> dict[str, Any]:
        return {"prune": dict(self.report)} if self.report else {}

    # --- which layers, at which density ------------------------------------------------

    def plan(self, job: CompressJob) -> tuple[dict[str, float], dict[str, float], list[str]]:
        """(layers of the global pool -> density, layers with their own density -> density,
        notes on target layers left dense)."""
        config = job.config
        modules = dict(job.model.named_modules())
        layers = [n for n, m in job.model.named_modules() if isinstance(m, PRUNABLE)]
        convs = [n for n in layers if not isinstance(modules[n], nn.Linear)]
        first, last = (convs[0] if convs else None), (layers[-1] if layers else None)
        check_density_globs(config, [f"{n}.weight" for n in layers])
        opts = config.options
        pool: dict[str, float] = {}
        own: dict[str, float] = {}
        dense: list[str] = []
        for weight in job.targets:
            name = weight.rsplit(".", 1)[0]
            if not isinstance(modules.get(name), PRUNABLE):
                dense.append(f"{name}: not a Conv/Linear layer")
            elif name == first and not opts["prune_first"]:
                dense.append(f"{name}: first conv kept dense (prune_first=false)")
            elif name == last and not opts["prune_last"]:
                dense.append(f"{name}: last layer kept dense (prune_last=false)")
            elif opts["scope"] == "layerwise" or has_own_density(config, weight):
                own[weight] = density_of(config.for_tensor(weight))
            else:
                pool[weight] = density_of(opts)
        if not pool and not own:
            raise ConfigError("prune: no layer left to prune (" + ("; ".join(dense) or
                              "no Conv or Linear layer") + ")")
        return pool, own, dense

    # --- scores ------------------------------------------------------------------------

    def masks(self, job: CompressJob, pool: dict[str, float],
              own: dict[str, float]) -> dict[str, Tensor]:
        """The keep-mask of every pruned weight, by the configured criterion: one ranking over
        the pool, one per layer with its own density."""
        opts = job.config.options
        names = [*pool, *own]
        criterion = opts["criterion"]
        if criterion == "ecs":
            weights, grads = self._ecs_scores(job, names)
        elif criterion == "snip":
            scores = self._snip_scores(job, names)
        else:
            params = dict(job.model.named_parameters())
            scores = {n: params[n].detach().abs() for n in names}

        def keep(subset: list[str], density: float) -> dict[str, Tensor]:
            if criterion == "ecs":
                return ecs_keep({n: weights[n] for n in subset}, {n: grads[n] for n in subset},
                                density, opts["ecs_threshold"])
            return keep_top({n: scores[n] for n in subset}, density)

        out = keep(list(pool), next(iter(pool.values()))) if pool else {}
        for name, density in own.items():
            out.update(keep([name], density))
        return out

    def _scoring_copy(self, job: CompressJob, names: list[str]) -> nn.Module:
        model = copy.deepcopy(job.model)
        init = job.config.options["score_init"]
        if init != "trained":
            fill = nn.init.kaiming_normal_ if init == "kaiming" else nn.init.xavier_normal_
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(job.seed)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n in names:
                    fill(params[n])
            torch.random.set_rng_state(gen_state)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _train_set(self, job: CompressJob) -> tuple[DataSpec, Any]:
        data = training_data(job.data, self.name)
        if data is None:
            raise DataError(f"prune: criterion {job.config.options['criterion']} scores weights "
                            f"on training batches: pass --cifar10 DIR, --imagenet DIR or "
                            f"--data DIR (or use criterion=magnitude)")
        return data, build_datasets(data, job.config.options["holdout"], job.seed)[0]

    def _gradients(self, job: CompressJob, model: nn.Module,
                   names: list[str]) -> dict[str, Tensor]:
        """Summed cross-entropy gradient of `score_batches` seeded training batches."""
        data, train_set = self._train_set(job)
        sampler = ShardSampler(len(train_set), seed=job.seed)
        loader = DataLoader(train_set, batch_size=data.batch_size, sampler=sampler,
                            num_workers=data.workers, collate_fn=collate_skipping)
        batches = ((b.images, b.targets) for b in loader if b.targets.numel())
        return loss_gradients(model, batches, names, job.config.options["score_batches"])

    def _snip_scores(self, job: CompressJob, names: list[str]) -> dict[str, Tensor]:
        model = self._scoring_copy(job, names)
        return snip_scores(model, self._gradients(job, model, names))

    def _ecs_scores(self, job: CompressJob,
                    names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(|w|, |g|) after the warm-up: the weights then, and the last batch's gradient."""
        opts = job.config.options
        model = self._scoring_copy(job, names)
        warmup = opts["ecs_warmup_epochs"]
        if warmup == 0:
            grads = self._gradients(job, model, names)
        else:
            data, train_set = self._train_set(job)
            last: dict[str, Tensor] = {}

            def keep_gradient(net: nn.Module) -> None:
                params = dict(net.named_parameters())
                for n in names:
                    last[n] = params[n].grad.detach().cpu().clone()

            lr = opts["warmup_lr"] or (REFERENCE_WARMUP_LR if opts["score_init"] != "trained"
                                       else opts["lr"])
            cfg = TrainConfig(epochs=warmup, lr=lr, lr_min=lr, weight_decay=5e-4,
                              batch_size=data.batch_size, workers=data.workers,
                              train_limit=opts["train_limit"] or None, seed=job.seed,
                              progress=job.progress, optimizer="sgd", log_epochs=False)
            fit(model, train_set, None, cfg, TrainHooks(after_step=keep_gradient))
            grads = last
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().abs() for n in names}, grads

    # --- the method --------------------------------------------------------------------

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        opts = job.config.options
        epochs = finetune_epochs(job, self.name, DEFAULT_EPOCHS_WITH_DATA)
        pool, own, dense = self.plan(job)
        started = time.perf_counter()
        teacher = teacher_of(job, epochs)
        masks = self.masks(job, pool, own)
        score_s = round(time.perf_counter() - started, 3)
        model = job.model.cpu()
        attach_masks(model, masks)
        self.report = {"criterion": opts["criterion"], "scope": opts["scope"],
                       "score_s": score_s, "dense": dense}
        if epochs > 0:
            for p in model.parameters():
                p.requires_grad_(True)
            self.report["finetune"] = run_finetune(job, self.name, epochs, teacher,
                                                   after_step=rezero_pruned)
            for p in model.parameters():
                p.requires_grad_(False)
        detach_masks(model.cpu(), masks)
        job.model.cpu().eval()
        job.take_model_state()
        kept = {n: int(m.sum()) for n, m in masks.items()}
        total = sum(m.numel() for m in masks.values())
        self.report.update(
            density=round(sum(kept.values()) / total, 6), pruned_weights=total,
            layers={n: {"kept": kept[n], "numel": masks[n].numel(),
                        "density": round(kept[n] / masks[n].numel(), 4)} for n in masks})
        return {n: raw_tensor(job.state_dict[n], job.config.for_tensor(n)["fp16"])
                for n in job.targets}


# --- gradients ------------------------------------------------------------------------


def loss_gradients(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   names: list[str], count: int) -> dict[str, Tensor]:
    """d(sum of the cross-entropy of `count` batches)/d(weight) for each named weight, with
    the model in training mode (BatchNorm on batch statistics, as the reference)."""
    device = local_device()
    model.to(device).train()
    model.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(batches):
        if i >= count:
            break
        nn.functional.cross_entropy(model(images.to(device)), targets.to(device)).backward()
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().cpu().clone() for n in names}


def snip_scores(model: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """|dL/dc| for a multiplicative mask c = 1 on each weight: |g * w|."""
    params = dict(model.named_parameters())
    return {n: (g * params[n].detach().cpu()).abs() for n, g in grads.items()}


# --- densities by glob --------------------------------------------------------------------


def density_of(opts: dict[str, Any]) -> float:
    return float(opts["retain"] if opts.get("retain") is not None else opts["density"])


def _matches(glob: str, weight: str) -> bool:
    module = weight.rsplit(".", 1)[0]
    return fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(weight, glob)


def has_own_density(config: MethodConfig, weight: str) -> bool:
    return any(k in values and _matches(glob, weight)
               for glob, values in config.layers for k in DENSITY_KEYS)


def check_density_globs(config: MethodConfig, weights: list[str]) -> None:
    """A per-layer density whose glob names no Conv/Linear layer is a mistake, not a no-op."""
    for glob, values in config.layers:
        if any(k in values for k in DENSITY_KEYS) and not any(_matches(glob, w)
                                                              for w in weights):
            names = ", ".join(w.rsplit(".", 1)[0] for w in weights[:6])
            raise ConfigError(f"prune: {glob}.density names no layer of this model (its "
                              f"layers: {names}{', ...' if len(weights) > 6 else ''})")


# --- the mask on the modules ------------------------------------------------------------


def attach_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """weight = weight_orig * weight_mask on every pruned module (torch's own pruning
    reparametrisation): pruned weights are zero in every forward and get zero gradient."""
    for weight, mask in masks.items():
        module = model.get_submodule(weight.rsplit(".", 1)[0])
        torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
        rezero(module)


def rezero(module: nn.Module) -> None:
    with torch.no_grad():
        module.weight_orig.mul_(module.weight_mask)


def rezero_pruned(model: nn.Module) -> None:
    """After every optimizer step: pruned entries of weight_orig back to exactly 0 (weight
    decay or momentum must not move them, so removing the mask later changes nothing)."""
    for module in model.modules():
        if hasattr(module, "weight_mask"):
            rezero(module)


def detach_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Make the pruning permanent: a plain weight Parameter with exact zeros."""
    for weight in masks:
        module = model.get_submodule(weight.rsplit(".", 1)[0])
        rezero(module)
        torch_prune.remove(module, "weight")
