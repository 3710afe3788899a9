"""`uniform` and `int8`: symmetric uniform grids, per output channel or per layer.

The grid is value = code * scale with codes in [-(2^(b-1)-1), 2^(b-1)-1] (zero point 0:
TensorRT's rule at 8 bits). `clip` picks the scale: `max` maps the largest magnitude to the
top code; `mse` searches clipping ratios for the smallest squared error per channel, which
trades a few clipped outliers for finer steps everywhere else.

`rounding` picks each weight's level on that grid: `nearest`; `rdo`, rate-distortion
optimised rounding (as in NNCodec/HEVC's RDOQ), which picks between the two levels around
each weight to minimise (error / step)^2 + rdo * bits(level), with bits from the layer's own
code histogram; or `adaround`, learned rounding on calibration images (packer.ptq.adaround).
`rdo` is off by default: at 3-4 bits it shrinks weights toward zero and costs points that
a size budget buys back more cheaply with bits (docs/BUDGET.md).
"""

from __future__ import annotations

from typing import Any

import torch

from packer.config import MethodConfig, Option
from packer.methods.base import CompressJob, PerTensorMethod
from packer.ptq.adaround import (
    AdaRoundSettings,
    adaround_model,
    channel_weights,
    learn_layer,
)
from packer.ptq.graph import following_norms
from packer.ptq.stats import input_grams, supported
from runtime.errors import ConfigError
from runtime.quant.grid import max_scales, round_to_grid
from runtime.tensors import (
    CompressedTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

MSE_RATIOS = torch.linspace(0.5, 1.0, 51)
INT8_MAX = 127  # symmetric int8 codes [-127, 127], zero point 0 (TensorRT's weight grid)
ADAROUND_CANDIDATE_ITERS = 500  # per budget candidate (at most adaround_iters)
ADAROUND_CANDIDATE_LR = 1e-2
# Budget candidates finer than these are rounded to nearest (learned rounding barely differs).
ADAROUND_CANDIDATE_MAX_BITS = 5
ADAROUND_CANDIDATE_MIN_STEP_RMS = 0.25
# What a size budget chooses from: bit widths, or steps of half an octave (about half a bit)
# from 4 (under half a bit per weight) to 1/64 of the channel RMS (about 8 bits).
BITS_RATES = (2, 3, 4, 5, 6, 7, 8)
STEP_RMS_RATES = tuple(round(2 ** (-k / 2), 4) for k in range(-4, 13))


def _bits_ok(b: int) -> str | None:
    return None if 2 <= b <= 8 else "bits must be between 2 and 8"


def _step_ok(s: float | None) -> str | None:
    return None if s is None or s > 0 else "step must be positive"


def _step_rms_ok(s: float | None) -> str | None:
    return None if s is None or 1e-4 <= s <= 16 else "step_rms must be between 1e-4 and 16"


def _rdo_ok(lam: float) -> str | None:
    return None if 0 <= lam <= 10 else "rdo must be between 0 and 10"


def _lr_ok(lr: float) -> str | None:
    return None if 0 < lr <= 1 else "adaround_lr must be in (0, 1]"


def _iters_ok(n: int) -> str | None:
    return None if 1 <= n <= 1_000_000 else "adaround_iters must be between 1 and 1000000"


def _channel_view(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def _mse_scales(rows: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared error of every candidate clipping ratio, per row; keep the best ratio.
    Rows go in chunks so the rows x ratios x columns temporary stays near 64 MB."""
    peak = rows.abs().amax(dim=1)
    cands = peak[:, None] * MSE_RATIOS[None, :] / qmax  # rows x R
    safe = torch.where(cands > 0, cands, torch.ones_like(cands))
    best = torch.empty_like(peak)
    chunk = max(1, (1 << 24) // (len(MSE_RATIOS) * rows.shape[1]))
    for start in range(0, rows.shape[0], chunk):
        r, c = rows[start : start + chunk], safe[start : start + chunk]
        q = torch.clamp(torch.round(r[:, None, :] / c[:, :, None]), -qmax, qmax)
        err = ((q * c[:, :, None] - r[:, None, :]) ** 2).sum(dim=2)
        best[start : start + chunk] = c.gather(1, err.argmin(1, keepdim=True)).squeeze(1)
    return torch.where(peak > 0, best, torch.ones_like(best))  # all-zero rows: scale 1


def rdo_round(scaled: torch.Tensor, codes: torch.Tensor, qmax: int, lam: float,
              iters: int = 3) -> torch.Tensor:
    """Re-round `scaled` (weights / step) to floor or ceil, trading squared error (in steps)
    against lam x the code's cost in bits under the current histogram; a few passes let
    the histogram and the choices settle."""
    lo = torch.clamp(torch.floor(scaled), -qmax, qmax)
    hi = torch.clamp(lo + 1, -qmax, qmax)
    for _ in range(iters):
        counts = torch.bincount((codes + qmax).reshape(-1).long(), minlength=2 * qmax + 1)
        cost = -torch.log2((counts.double() + 0.5) / (counts.sum() + 0.5 * counts.numel()))
        c_lo = (scaled - lo) ** 2 + lam * cost[(lo + qmax).long()].float()
        c_hi = (scaled - hi) ** 2 + lam * cost[(hi + qmax).long()].float()
        codes = torch.where(c_lo <= c_hi, lo, hi).to(torch.int32)
    return codes


def quantize_symmetric(weight: torch.Tensor, bits: int, per_channel: bool = True,
                       clip: str = "max", step: float | None = None,
                       rdo: float = 0.0, step_rms: float | None = None) -> UniformTensor:
    rows = _channel_view(weight, per_channel)
    if step is not None:
        # A fixed step: the bit width follows from the largest code actually needed.
        peak_code = int(torch.round(rows.abs().max() / step).item())
        bits = max(2, min(16, peak_code.bit_length() + 1))
        scales = torch.full((rows.shape[0],), float(step))
    elif step_rms is not None:
        # A step per row relative to its RMS and (below 8 bits) no clipping: the grid entropy
        # coding wants; the rate follows the step, the bit width only bounds the largest code.
        scales = step_rms * rows.pow(2).mean(1).sqrt()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        peak_code = int(torch.round((rows.abs() / scales[:, None]).max()).item())
        bits = max(2, min(8, peak_code.bit_length() + 1))
    qmax = (1 << (bits - 1)) - 1
    if step is None and step_rms is None:
        scales = max_scales(rows, qmax) if clip == "max" else _mse_scales(rows, qmax)
    codes = round_to_grid(rows, scales, qmax)
    if rdo > 0:
        codes = rdo_round(rows / scales[:, None], codes, qmax, rdo)
    axis = 0 if per_channel and weight.dim() > 1 else None
    return UniformTensor(codes.reshape(weight.shape), scales.to(torch.float32), None, bits,
                         axis, weight.dtype)


class UniformMethod(PerTensorMethod):
    name = "uniform"
    chain_rank = 2
    summary = "symmetric uniform grid per output channel (or layer), entropy-coded"
    options = {
        "bits": Option(5, "bit width of the grid (2-8)", int, check=_bits_ok),
        "step": Option(None, "fixed step size instead of bits (bit width follows)", float,
                       check=_step_ok),
        "step_rms": Option(None, "step per channel as a multiple of its RMS instead of bits "
                           "(unclipped grid for entropy coding; bit width follows, at most 8)",
                           float, check=_step_rms_ok),
        "granularity": Option("channel", "one scale per output channel or per layer", str,
                              choices=("channel", "layer")),
        "clip": Option("max", "scale rule: max magnitude, or MSE-optimal clipping", str,
                       choices=("max", "mse")),
        "rounding": Option("nearest", "nearest, rdo (rate-distortion, weight `rdo`) or "
                           "adaround (learned on --calib-data images)", str,
                           choices=("nearest", "rdo", "adaround")),
        "rdo": Option(0.1, "weight of the rate term for rounding=rdo", float, check=_rdo_ok),
        "adaround_iters": Option(2000, "AdaRound optimisation steps per layer", int,
                                 check=_iters_ok, per_layer=False),
        "adaround_lr": Option(1e-2, "AdaRound Adam learning rate", float, check=_lr_ok,
                              per_layer=False),
        "adaround_candidates": Option(True, "under a size budget, measure each candidate "
                                      "AdaRounded (else rounded to nearest)", bool,
                                      per_layer=False),
        "budget_knob": Option("step_rms", "what a size budget chooses per layer: step_rms "
                              "(half-octave steps) or bits (2-8, with `clip`)", str,
                              choices=("step_rms", "bits"), per_layer=False),
    }
    rate_option = "step_rms"
    rate_settings = ("step_rms", "bits", "step")
    rates = STEP_RMS_RATES

    def knob(self, config: MethodConfig) -> str:
        return str(config.options["budget_knob"])

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> UniformTensor:
        rdo = opts["rdo"] if opts.get("rounding") == "rdo" else 0.0
        return quantize_symmetric(weight, opts["bits"], opts["granularity"] == "channel",
                                  opts["clip"], opts["step"], rdo, opts["step_rms"])

    def candidate_rates(self, job: CompressJob, name: str) -> list[float]:
        return list(BITS_RATES if self.knob(job.config) == "bits" else STEP_RMS_RATES)

    def prepare_candidates(self, job: CompressJob) -> None:
        """With rounding=adaround, budget candidates are AdaRounded too (each layer alone, on
        full-precision inputs, ADAROUND_CANDIDATE_ITERS steps): learned rounding makes low
        bit widths far cheaper, and sensitivities of nearest rounding would not see it."""
        self._grams: dict[str, torch.Tensor] = {}
        learn = {n.rsplit(".", 1)[0]: job.model.get_submodule(n.rsplit(".", 1)[0])
                 for n in job.targets
                 if job.config.for_tensor(n)["rounding"] == "adaround"}
        learn = {n: m for n, m in learn.items() if supported(m)}
        if learn and job.calib is not None and job.config.options["adaround_candidates"]:
            self._grams = input_grams(job.model, learn, job.calib.batches())
            self._norms = following_norms(job.model)

    @staticmethod
    def _candidate_iters(config: MethodConfig) -> int:
        return min(ADAROUND_CANDIDATE_ITERS, int(config.options["adaround_iters"]))

    def candidate_key(self, config: MethodConfig) -> str:
        """Candidates depend on the AdaRound options only through _candidate_iters."""
        options = {k: v for k, v in config.options.items() if not k.startswith("adaround_")}
        options["adaround_candidates"] = config.options["adaround_candidates"]
        options["candidate_iters"] = self._candidate_iters(config)
        return MethodConfig(config.method, options, config.layers).to_json()

    def layer_candidate(self, job: CompressJob, name: str, rate: float | None
                        ) -> CompressedTensor:
        opts = job.config.for_tensor(name)
        if rate is not None:  # the knob's value; the other rate settings step aside
            opts = {**opts, "step": None, "step_rms": None, self.knob(job.config): rate}
        nearest = self.compress_tensor(name, job.state_dict[name], opts)
        layer = name.rsplit(".", 1)[0]
        grams = getattr(self, "_grams", {})
        coarse = (rate is not None and (rate >= ADAROUND_CANDIDATE_MIN_STEP_RMS
                                        if self.knob(job.config) == "step_rms"
                                        else rate <= ADAROUND_CANDIDATE_MAX_BITS))
        if layer not in grams or not coarse:
            return nearest
        g = grams[layer]
        settings = AdaRoundSettings(iters=self._candidate_iters(job.config),
                                    lr=ADAROUND_CANDIDATE_LR)
        learned, _ = learn_layer(job.model.get_submodule(layer), nearest, (g, g, g),
                                 channel_weights(job.model, layer, self._norms), settings)
        return learned

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        out = super().compress(job)
        learn = [n for n in job.targets if job.config.for_tensor(n)["rounding"] == "adaround"]
        self.report = {}
        if learn:
            if job.calib is None:
                raise ConfigError("uniform rounding=adaround learns from calibration images: "
                                  "pass --calib-data DIR")
            opts = job.config.options
            settings = AdaRoundSettings(iters=opts["adaround_iters"], lr=opts["adaround_lr"])
            learned, self.report = adaround_model(job.model, out, learn,
                                                  list(job.calib.batches()), settings,
                                                  job.progress)
            out.update(learned)
        return out


class Int8Method(UniformMethod):
    """Post-training int8, and the grid-snapping stage of a chain.

    After a codebook stage (`kmeans+int8`, `prune+kmeans+int8`, `pqf+int8`) it snaps the
    codebook, not the weights: one scale per tensor, s = max|codebook| / 127, every entry
    rounded to q * s with |q| <= 127 (entries that meet are merged). The indices, and so the
    codebook's few bits per weight and its exact zeros, are kept, while every weight is exactly
    int8: q * s is on TensorRT's per-channel grid with every channel's scale s, which
    runtime.quant finds, so int8 inference adds no error. Re-quantizing the weights per channel
    instead would spend ~8 bits of entropy-coded codes per weight and lose the codebook.
    A symmetric grid of <= 8 bits is kept as it is (already int8); anything else is quantized
    per channel as `int8` alone does.
    """

    name = "int8"
    chain_rank = 3  # after a representation: snaps it to the int8 grid
    summary = "symmetric int8 per output channel (TensorRT's grid); in a chain, snaps codebooks"
    options = {
        "granularity": UniformMethod.options["granularity"],
        "clip": Option("max", "scale rule: max magnitude, or MSE-optimal clipping", str,
                       choices=("max", "mse")),
    }
    rate_option = None  # one grid, no rate knob
    rates = ()

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        out: dict[str, CompressedTensor] = {}
        for name in job.targets:
            previous = job.previous.get(name)
            if isinstance(previous, ScalarCodebookTensor | VectorCodebookTensor):
                out[name] = snap_codebook(previous)
            elif (isinstance(previous, UniformTensor) and previous.zero_points is None
                  and previous.bits <= 8 and previous.axis in (None, 0)):
                out[name] = previous
            else:
                out[name] = self.compress_tensor(name, job.state_dict[name],
                                                 job.config.for_tensor(name))
        return out

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> UniformTensor:
        return quantize_symmetric(weight, 8, opts["granularity"] == "channel", opts["clip"])


def int8_codebook(codebook: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(codes in [-127, 127], scale) of a codebook on one symmetric int8 grid: the grid rule
    of runtime.quant.grid with the whole codebook as one row."""
    row = codebook.detach().to(torch.float32).reshape(1, -1)
    scale = max_scales(row, INT8_MAX) if row.numel() else torch.ones(1)
    codes = round_to_grid(row, scale, INT8_MAX).reshape(codebook.shape)
    return codes, float(scale[0])


def snap_codebook(tensor: ScalarCodebookTensor | VectorCodebookTensor
                  ) -> ScalarCodebookTensor | VectorCodebookTensor:
    """The same tensor with its codebook on one int8 grid (float32 q * s); entries that snap
    to the same value are merged and the indices renumbered, in increasing entry order."""
    codes, scale = int8_codebook(tensor.codebook)
    rows = codes.reshape(codes.shape[0], -1)
    unique, remap = torch.unique(rows, dim=0, return_inverse=True)
    codebook = (unique.to(torch.float32) * torch.tensor(scale, dtype=torch.float32))
    indices = remap[tensor.indices.long()]
    if isinstance(tensor, VectorCodebookTensor):
        return VectorCodebookTensor(codebook.contiguous(), indices, tensor.shape, tensor.dtype)
    return ScalarCodebookTensor(codebook.reshape(-1).contiguous(), indices, tensor.dtype)
