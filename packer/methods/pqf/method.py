"""`pqf`: permute, product-quantize, fine-tune (Martinez et al. 2021).

Pipeline: plan each Conv/Linear (sub-vector size by kind, K by the reference's rule, notes
for fallbacks) -> optimise channel permutations on the fx graph -> k-means every planned
layer -> fine-tune codebooks, biases, BatchNorm and uncompressed layers through the shared
training loop -> VectorCodebook tensors with fp16 codebooks. The reference's analytic size
rule is kept in `self.report` for the packer's report (`reference_bits`, `reference_mib`).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from packer.config import Option, closed_interval
from packer.methods.base import CompressJob, Method
from packer.methods.pqf.kmeans import INITS, KMEANS_TYPES, kmeans
from packer.methods.pqf.layers import (
    PQ_LAYERS,
    LayerPlan,
    attach_pq,
    codebook_size,
    detach_pq,
    plan_layer,
    subvectors,
)
from packer.methods.pqf.permute import permute_model
from packer.methods.pqf.size import reference_size
from packer.training import DataSpec, build_datasets, epochs_to_run, training_data
from packer.training.finetune import finetune
from runtime.distributed import local_device
from runtime.errors import ConfigError, DataError
from runtime.tensors import CompressedTensor, VectorCodebookTensor

log = logging.getLogger(__name__)

DEFAULT_EPOCHS_WITH_DATA = 9  # the reference's ResNet schedule


def _epochs_ok(v: int | None) -> str | None:
    return None if v is None or 0 <= v <= 1000 else "finetune_epochs must be between 0 and 1000"


def _subvector_ok(v: int) -> str | None:
    return None if v == 0 or 2 <= v <= 1024 else "sub-vector size must be 0 (auto) or 2..1024"


class PQFMethod(Method):
    name = "pqf"
    chain_rank = 2
    trains = True
    summary = "permute, product-quantize (vector codebooks), fine-tune codebooks (PQF)"
    options = {
        "k": Option(256, "codewords per layer; K = min(k, 2^floor(log2(n_subvectors/4)))", int,
                    check=closed_interval(2, 65536, "k")),
        "large_subvectors": Option(False, "kxk convs: d = 2*k*k ('large blocks') not k*k",
                                   bool),
        "pw_subvector_size": Option(4, "sub-vector size of 1x1 convs", int,
                                    check=_subvector_ok),
        "fc_subvector_size": Option(4, "sub-vector size of Linear layers", int,
                                    check=_subvector_ok),
        "subvector_size": Option(0, "explicit sub-vector size (0: by layer kind)", int,
                                 check=_subvector_ok),
        "kmeans_iters": Option(100, "k-means iterations", int,
                               check=closed_interval(0, 100_000, "kmeans_iters")),
        "kmeans_type": Option("src", "'src' (annealed noise, the reference's) or 'kmeans'",
                              str, choices=KMEANS_TYPES, per_layer=False),
        "kmeans_init": Option("kmeans++", "codebook init: 'kmeans++' or the reference's "
                              "'random'", str, choices=INITS, per_layer=False),
        "use_permutations": Option(True, "optimise channel permutations first", bool,
                                   per_layer=False),
        "sls_iterations": Option(10_000, "stochastic local search swaps per group", int,
                                 check=closed_interval(0, 10_000_000, "sls_iterations"),
                                 per_layer=False),
        "keep_first_conv": Option(True, "leave the first conv uncompressed (the reference's "
                                  "ignored conv1)", bool, per_layer=False),
        "codebook_fp16": Option(True, "store codebooks at float16", bool),
        "finetune_epochs": Option(None, "fine-tuning epochs (unset: 9, which needs training "
                                  "data; 0: post-training, no data)", int, check=_epochs_ok,
                                  per_layer=False),
        "lr": Option(1e-3, "Adam learning rate (cosine to lr_min, stepped per batch)", float,
                     check=closed_interval(1e-9, 10.0, "lr"), per_layer=False),
        "lr_min": Option(1e-6, "final learning rate of the cosine schedule", float,
                         check=closed_interval(0.0, 10.0, "lr_min"), per_layer=False),
        "train_limit": Option(0, "training images per epoch, drawn at random (0: all)", int,
                              check=closed_interval(0, 10**9, "train_limit"), per_layer=False),
        "val_limit": Option(0, "validation images (0: all)", int,
                            check=closed_interval(0, 10**9, "val_limit"), per_layer=False),
        "holdout": Option(0, "training images held out (seeded) for the per-epoch validation "
                          "that picks the best epoch; 0: validate on the test/val split",
                          int, check=closed_interval(0, 10**9, "holdout"), per_layer=False),
        "distill": Option(False, "fine-tune against the uncompressed model's outputs "
                          "(knowledge distillation) instead of the labels", bool,
                          per_layer=False),
        "distill_temperature": Option(4.0, "softmax temperature of the distillation loss "
                                      "(4 beat 1 by 0.26 pts on ResNet-20, docs/PQF.md)",
                                      float, per_layer=False,
                                      check=closed_interval(0.05, 100.0, "distill_temperature")),
        "checkpoint": Option(None, "fine-tuning checkpoint file: written every epoch, resumed "
                             "from if present", str, per_layer=False),
    }

    rate_option = "k"
    rates = (8, 16, 32, 64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        self._reference: nn.Module | None = None
        self._candidate_plans: dict[str, tuple[int, LayerPlan]] = {}

    # --- post-training hooks (packer.ptq) --------------------------------------------------

    def post_training(self, job: CompressJob) -> bool:
        return self._training(job)[0] == 0

    def reference_model(self) -> nn.Module | None:
        return self._reference

    def prepare_candidates(self, job: CompressJob) -> None:
        """Permute job.model (a scratch copy) as compress() will, and plan every layer."""
        plans, _ = self.plan(job)
        if job.config.options["use_permutations"]:
            permute_model(job.model, {n: p.d for n, p in plans.items()},
                          job.config.options["sls_iterations"], job.seed)
        self._candidate_plans = {p.weight: (i, p) for i, p in enumerate(plans.values())}

    def budget_layers(self, job: CompressJob) -> list[str]:
        return list(self._candidate_plans)

    def candidate_rates(self, job: CompressJob, name: str) -> list[int]:
        plan = self._candidate_plans[name][1]
        return sorted({codebook_size(k, plan.n) for k in self.rates} - {0, 1})

    def layer_candidate(self, job: CompressJob, name: str, rate: float | None
                        ) -> CompressedTensor:
        """k-means of this layer's sub-vectors at K=rate, with the seed compress() uses."""
        index, plan = self._candidate_plans[name]
        rate = plan.k if rate is None else int(rate)
        module = job.model.get_submodule(plan.name)
        lopts = job.config.for_tensor(name)
        opts = job.config.options
        res = kmeans(subvectors(module.weight, plan.d).to(local_device()), rate,
                     int(lopts["kmeans_iters"]), kind=opts["kmeans_type"],
                     init=opts["kmeans_init"], seed=job.seed * 7919 + index)
        codebook = res.centroids.cpu()
        codebook = codebook.half() if lopts["codebook_fp16"] else codebook.float()
        return VectorCodebookTensor(codebook.contiguous(), res.codes.cpu().reshape(-1).clone(),
                                    plan.shape, torch.float32)

    # --- steps ---------------------------------------------------------------------------

    def plan(self, job: CompressJob) -> tuple[dict[str, LayerPlan], list[str]]:
        """Per-layer plans, and notes on every target left uncompressed (and why)."""
        opts = job.config.options
        modules = dict(job.model.named_modules())
        all_layers = [n for n, m in job.model.named_modules() if isinstance(m, PQ_LAYERS)]
        first = all_layers[0] if all_layers else None
        plans: dict[str, LayerPlan] = {}
        skipped: list[str] = []
        for weight in job.targets:
            name = weight.rsplit(".", 1)[0]
            module = modules.get(name)
            if not isinstance(module, PQ_LAYERS):
                skipped.append(f"{name}: not a Conv/Linear layer; left uncompressed")
                continue
            if opts["keep_first_conv"] and name == first and not isinstance(module, nn.Linear):
                skipped.append(f"{name}: first conv kept uncompressed (keep_first_conv=true)")
                continue
            plan, why = plan_layer(name, module, job.config.for_tensor(weight))
            if plan is None:
                skipped.append(str(why))
            else:
                plans[name] = plan
        if not plans:
            raise ConfigError("pqf: no layer can be product-quantized ("
                              + ("; ".join(skipped) or "no Conv or Linear layer") + ")")
        for plan in plans.values():
            for note in plan.notes:
                (log.info if "capped" in note else log.warning)("pqf %s: %s", plan.name, note)
        for note in skipped:
            log.info("pqf %s", note)
        return plans, skipped

    def _training(self, job: CompressJob) -> tuple[int, DataSpec | None]:
        opts = job.config.options
        epochs = opts["finetune_epochs"]
        data = training_data(job.data, self.name)
        if epochs is None and data is None:
            # Without fine-tuning the codebooks PQF loses most of its accuracy (ResNet-20:
            # 42.75% from 88.25%); that must be asked for, never fallen into.
            raise DataError("pqf: fine-tuning the codebooks needs training data: pass "
                            "--cifar10 DIR, --imagenet DIR or --data DIR, or set "
                            "finetune_epochs=0 for the far less accurate post-training variant")
        return epochs_to_run(epochs, data, self.name, "finetune_epochs",
                             DEFAULT_EPOCHS_WITH_DATA, "the post-training variant"), data

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        opts = job.config.options
        epochs, data = self._training(job)
        plans, skipped = self.plan(job)
        model = job.model
        timings: dict[str, float] = {}
        self.report = {"pqf_layers": {}, "pqf_uncompressed": skipped}

        started = time.perf_counter()
        if opts["use_permutations"]:
            groups = permute_model(model, {n: p.d for n, p in plans.items()},
                                   opts["sls_iterations"], job.seed)
            self.report["pqf_permutations"] = groups
        timings["permutation_s"] = round(time.perf_counter() - started, 3)
        self._reference = copy.deepcopy(model).eval()  # full precision, permuted layout

        teacher = copy.deepcopy(model).eval() if opts["distill"] and epochs > 0 else None
        started = time.perf_counter()
        device = local_device()
        bar = tqdm(list(plans.values()), desc="pqf k-means", unit="layer",
                   disable=not job.progress, leave=False)
        for i, plan in enumerate(bar):
            module = model.get_submodule(plan.name)
            lopts = job.config.for_tensor(plan.weight)
            x = subvectors(module.weight, plan.d).to(device)
            res = kmeans(x, plan.k, int(lopts["kmeans_iters"]), kind=opts["kmeans_type"],
                         init=opts["kmeans_init"], seed=job.seed * 7919 + i)
            plan.stats.update(mse=res.mse, empty_reseeded=res.empty_reseeded,
                              iterations=res.iterations)
            attach_pq(module, res.centroids.cpu(), res.codes.cpu())
        timings["kmeans_s"] = round(time.perf_counter() - started, 3)
        self.report.update(reference_size(model, plans))

        if epochs > 0 and data is not None:
            self.report["pqf_finetune"] = self._finetune(job, epochs, data, teacher)

        out: dict[str, CompressedTensor] = {}
        for plan in plans.values():
            module = model.get_submodule(plan.name)
            out[plan.weight] = detach_pq(module,
                                         bool(job.config.for_tensor(plan.weight)["codebook_fp16"]))
            self.report["pqf_layers"][plan.name] = {
                "d": plan.d, "k": plan.k, "subvectors": plan.n, **plan.stats,
                **({"notes": plan.notes} if plan.notes else {})}
        model.cpu().eval()
        job.take_model_state()  # the permuted and fine-tuned BN, biases, kept first conv
        self.report["pqf_timings"] = timings
        return out

    def _finetune(self, job: CompressJob, epochs: int, data: DataSpec,
                  teacher: nn.Module | None) -> dict[str, Any]:
        # codebooks, biases, BN and uncompressed layers train; codes are buffers
        train_set, val_set = build_datasets(data, job.config.options["holdout"], job.seed)
        return finetune(job, epochs, data, train_set, val_set, teacher)
