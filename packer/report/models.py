"""The models a report looks at: a checkpoint or a packed file, read once into one view.

A packed file is decoded through the runtime's reader (so the report sees exactly what a user
of the file gets), and its compressed tensors are kept to mark codebook values; a checkpoint
is read with the packer's own safe loader and architecture inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from packer.architecture import GRAPH, resolve
from packer.checkpoint import load_checkpoint
from runtime import zoo
from runtime.decode import decode_tensor
from runtime.errors import ArchitectureError, WeightpackError
from runtime.format.preamble import MAGIC
from runtime.format.reader import open_packed
from runtime.format.records import InputSpec
from runtime.loader import build_module
from runtime.tensors import (
    CompressedTensor,
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

MAX_MARKS = 64  # more codebook values than this are described, not drawn one by one


@dataclass(frozen=True)
class Marks:
    """The values a compressed tensor can take, when few enough to draw, and what it is."""

    values: np.ndarray  # sorted; empty when not drawn
    note: str  # e.g. "K=32 codebook", "4-bit grid per channel", "raw"


@dataclass
class ModelView:
    """One model as the report sees it: weights, how they were stored, and a runnable module."""

    path: Path
    kind: str  # "packed" | "checkpoint"
    arch: str  # zoo builder name, or "graph"
    weights: dict[str, torch.Tensor]  # the whole state_dict, dequantized
    module: nn.Module | None  # None when the model cannot run in torch here (a stored graph)
    input_spec: InputSpec | None
    method: str = ""
    class_names: tuple[str, ...] = ()
    marks: dict[str, Marks] = field(default_factory=dict)  # packed files only
    fp32_bytes: int = 0  # packed files: the weights' size at fp32, as the file records it

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.method or 'original'})"

    def weight_names(self) -> list[str]:
        """Conv and Linear weights (float, 2-D or more, named `*weight`), in model order."""
        return [n for n, t in self.weights.items()
                if n.endswith("weight") and t.dim() >= 2 and t.is_floating_point()]


def is_packed(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        raise WeightpackError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WeightpackError(f"{path}: is a folder, not a model or packed file") from None
    except OSError as exc:
        raise WeightpackError(f"{path}: cannot read ({exc.strerror})") from None


def load_view(path: str | Path, arch: str | None = None) -> ModelView:
    """Read a packed file or a checkpoint (`arch` picks the architecture of a checkpoint)."""
    path = Path(path)
    return _packed_view(path) if is_packed(path) else _checkpoint_view(path, arch)


def _packed_view(path: Path) -> ModelView:
    with open_packed(path) as packed:
        model = packed.model
        compressed = {t.name: decode_tensor(packed, t) for t in model.tensors}
    weights = {name: c.dequantize() for name, c in compressed.items()}
    module = None
    if model.architecture.kind == "builder":
        module = build_module(model)
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError:
            raise ArchitectureError(f"{path}: tensors do not fit architecture "
                                    f"{model.architecture.builder}") from None
        module.eval()
    return ModelView(
        path=path, kind="packed",
        arch=model.architecture.builder if model.architecture.kind == "builder" else GRAPH,
        weights=weights, module=module, input_spec=model.input, method=model.method,
        class_names=model.class_names,
        marks={name: marks_of(c) for name, c in compressed.items()},
        fp32_bytes=model.fp32_bytes)


def _checkpoint_view(path: Path, arch: str | None) -> ModelView:
    checkpoint = load_checkpoint(path)
    resolved = resolve(checkpoint.state_dict, arch, checkpoint.module)
    if resolved.kind != "builder":  # a TorchScript graph: its ReLUs are not visible to torch
        return ModelView(path, "checkpoint", GRAPH, checkpoint.state_dict, None, None)
    return ModelView(path, "checkpoint", resolved.name, resolved.model.state_dict(),
                     resolved.model.eval(), zoo.input_spec(resolved.name))


def marks_of(tensor: CompressedTensor) -> Marks:
    """The stored levels of one tensor: drawn when there are at most MAX_MARKS of them."""
    if isinstance(tensor, ScalarCodebookTensor):
        values = np.unique(tensor.codebook.float().numpy())
        return _drawn(values, f"K={tensor.codebook.shape[0]} codebook")
    if isinstance(tensor, UniformTensor):
        if tensor.axis is not None and tensor.scales.numel() > 1:
            return Marks(np.empty(0), f"{tensor.bits}-bit grid per channel "
                                      f"({tensor.scales.numel()} scales)")
        low, high = tensor.code_range
        zero = 0 if tensor.zero_points is None else int(tensor.zero_points.reshape(-1)[0])
        values = (np.arange(low, high + 1) - zero) * float(tensor.scales.reshape(-1)[0])
        return _drawn(values.astype(np.float32), f"{tensor.bits}-bit grid")
    if isinstance(tensor, VectorCodebookTensor):
        k, d = tensor.codebook.shape
        return Marks(np.empty(0), f"K={k} codewords of {d} values")
    assert isinstance(tensor, RawTensor)
    return Marks(np.empty(0), f"raw {str(tensor.values.dtype).removeprefix('torch.')}")


def _drawn(values: np.ndarray, note: str) -> Marks:
    if values.size > MAX_MARKS:
        return Marks(np.empty(0), f"{note} ({values.size} levels, not drawn)")
    return Marks(np.sort(values), note)


def order_pair(subject: ModelView, other: ModelView) -> tuple[ModelView, ModelView]:
    """(before, after): the checkpoint is "before" a packed file; otherwise --compare is."""
    if subject.kind == "checkpoint" and other.kind == "packed":
        return subject, other
    return other, subject


def check_comparable(a: ModelView, b: ModelView) -> None:
    """Both models must hold the same tensors with the same shapes, or nothing lines up."""
    only_a = [n for n in a.weights if n not in b.weights]
    only_b = [n for n in b.weights if n not in a.weights]
    shapes = [n for n in a.weights if n in b.weights and a.weights[n].shape != b.weights[n].shape]
    if not (only_a or only_b or shapes):
        return
    if shapes:
        n = shapes[0]
        detail = (f"{n} is {_shape(a.weights[n])} in one and {_shape(b.weights[n])} in the "
                  f"other")
    else:
        detail = f"{len(only_a)} tensors only in {a.path.name}, {len(only_b)} only in {b.path.name}"
    raise ArchitectureError(
        f"{a.path.name} ({a.arch}) and {b.path.name} ({b.arch}) are different models ({detail}); "
        f"--compare needs the same architecture before and after compression")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"
