"""The parameters a weight-fixing method clusters, which of them are fixed, and at what value.

WFN and PWFN cluster one network-wide vector (every fixable parameter flattened in module
order) but train per-layer tensors. `FixedParams` keeps both views: flat values and masks for
the clustering steps, per-parameter masks for the training loop (fixed entries get no
gradient and are re-projected after every step, so nothing moves them: not Adam's momentum,
not weight decay), and per-tensor codebook + index tensors for the packer at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from runtime.tensors import ScalarCodebookTensor


@dataclass
class Entry:
    name: str  # state-dict key, e.g. "layer1.0.conv1.weight"
    param: nn.Parameter
    fixed: Tensor  # bool, same shape
    values: Tensor  # float32, same shape; meaningful where fixed


def value_stats(flat: Tensor) -> dict[str, Any]:
    """Unique-value counts and base-2 entropy, over all values and excluding exact zeros
    (the two conventions of the WFN/PWFN papers, named as such)."""

    def stats(v: Tensor) -> tuple[int, float]:
        if v.numel() == 0:
            return 0, 0.0
        _, counts = torch.unique(v, return_counts=True)
        p = counts.double() / v.numel()
        return int(counts.numel()), float(-(p * torch.log2(p)).sum())

    all_n, all_h = stats(flat)
    nz_n, nz_h = stats(flat[flat != 0])
    return {"unique_values": all_n, "unique_values_nonzero": nz_n,
            "entropy_bits": round(all_h, 4), "entropy_bits_nonzero": round(nz_h, 4),
            "zero_fraction": round(float((flat == 0).double().mean()) if flat.numel() else 0.0,
                                   4)}


class FixedParams:
    """Fixable parameters of a model, in module order, with their fixed masks and values."""

    def __init__(self, model: nn.Module, names: Iterable[str],
                 params: dict[str, nn.Parameter] | None = None) -> None:
        """`params` maps a name to the parameter to train for it (PWFN trains a mean that
        stands in for the weight); by default the model's own parameter of that name."""
        own = dict(model.named_parameters())
        chosen = params or {}
        self.entries: list[Entry] = []
        for name in names:
            param = chosen.get(name, own.get(name))
            if param is None:
                raise KeyError(name)
            self.entries.append(Entry(name, param,
                                      torch.zeros(param.shape, dtype=torch.bool),
                                      torch.zeros(param.shape, dtype=torch.float32)))
        self._hooks: list[Any] = []

    # --- flat views ------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return sum(e.param.numel() for e in self.entries)

    def flat_values(self) -> Tensor:
        """Current values (fixed entries at their fixed value), float32 on the CPU."""
        return torch.cat([e.param.detach().float().cpu().reshape(-1) for e in self.entries])

    def flat_fixed(self) -> Tensor:
        return torch.cat([e.fixed.reshape(-1) for e in self.entries])

    def fixed_fraction(self) -> float:
        return float(self.flat_fixed().double().mean()) if self.entries else 0.0

    def set_fixed(self, values: Tensor, fixed: Tensor) -> None:
        """Fix the entries where `fixed` (flat) at `values` (flat) and write them into the
        parameters; entries not fixed keep their current trained value."""
        offset = 0
        for e in self.entries:
            n = e.param.numel()
            mask = fixed[offset:offset + n].reshape(e.param.shape).clone()
            vals = values[offset:offset + n].reshape(e.param.shape).float()
            e.fixed, e.values = mask, torch.where(mask, vals, torch.zeros_like(vals))
            offset += n
        self.project()

    def centres(self) -> Tensor:
        """The distinct values of all fixed entries, sorted (the chosen centre set)."""
        fixed = self.flat_fixed()
        if not bool(fixed.any()):
            return torch.zeros(0)
        return torch.unique(torch.cat([e.values[e.fixed] for e in self.entries]))

    def stats(self) -> dict[str, Any]:
        return value_stats(self.flat_values())

    # --- training --------------------------------------------------------------------------

    @torch.no_grad()
    def project(self) -> None:
        """Put every fixed entry back at exactly its fixed value."""
        for e in self.entries:
            if bool(e.fixed.any()):
                mask = e.fixed.to(e.param.device)
                e.param.data[mask] = e.values.to(e.param.device, e.param.dtype)[mask]

    def freeze_fixed(self) -> None:
        """Zero the gradient of fixed entries (hooks read the masks at backward time)."""
        self.release()
        for e in self.entries:
            self._hooks.append(e.param.register_hook(
                lambda grad, e=e: grad.masked_fill(e.fixed.to(grad.device), 0.0)))

    def release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def free_values(self) -> Tensor:
        """The unfixed entries as one differentiable vector (for regularisers)."""
        parts = [e.param.reshape(-1)[~e.fixed.reshape(-1).to(e.param.device)]
                 for e in self.entries]
        return torch.cat(parts) if parts else torch.zeros(0)

    # --- results ---------------------------------------------------------------------------

    def compressed(self) -> dict[str, ScalarCodebookTensor]:
        """One codebook (the values it uses) + index tensor per parameter. Codebooks are
        stored at float16 when every value is exact there (short sums of powers of two
        usually are), else float32."""
        out: dict[str, ScalarCodebookTensor] = {}
        for e in self.entries:
            w = e.param.detach().float().cpu()
            codebook, indices = torch.unique(w, return_inverse=True)
            if codebook.numel() > 65536:
                raise ValueError(f"{e.name}: {codebook.numel()} distinct values; is it fixed?")
            half = codebook.half()
            if torch.equal(half.float(), codebook) and bool(torch.isfinite(half).all()):
                codebook = half
            out[e.name] = ScalarCodebookTensor(codebook.contiguous(),
                                               indices.reshape(w.shape), e.param.dtype)
        return out

    def state(self) -> dict[str, Tensor]:
        """Masks and values, for iteration checkpoints."""
        out: dict[str, Tensor] = {}
        for e in self.entries:
            out[f"{e.name}/fixed"] = e.fixed.clone()
            out[f"{e.name}/values"] = e.values.clone()
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        for e in self.entries:
            fixed, values = state[f"{e.name}/fixed"], state[f"{e.name}/values"]
            if fixed.shape != e.param.shape:
                raise ValueError(f"{e.name}: checkpoint shape {tuple(fixed.shape)}")
            e.fixed, e.values = fixed.bool().clone(), values.float().clone()
        self.project()

