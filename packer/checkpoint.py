"""Read a user's checkpoint into a flat state_dict without executing untrusted code."""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import CheckpointError

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    fmt: str  # "state_dict" | "safetensors" | "torchscript" | "pickled_module"
    module: torch.nn.Module | None = None  # TorchScript / trusted pickled module, if any
    input_shape: tuple[int, ...] | None = None  # a traced module's example input, batch dropped


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the state_dict inside common wrappers and drop DataParallel's `module.` prefix."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (expected a state_dict)")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _torchscript_members(path: Path) -> list[str] | None:
    """The archive's member names if `path` is a TorchScript archive, else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        members = z.namelist()
    return members if any(n.endswith("/constants.pkl") or "/code/" in n for n in members) else None


def _traced_input_shape(module: torch.jit.ScriptModule) -> tuple[int, ...] | None:
    """The shape torch.jit.trace recorded for forward's one tensor input, without the batch
    dimension; None for a scripted module, several inputs, or a shape that is not 4-d."""
    inputs = list(module.forward.graph.inputs())[1:]  # the first is `self`
    if len(inputs) != 1:
        return None
    kind = inputs[0].type()
    sizes = kind.sizes() if isinstance(kind, torch.TensorType) else None
    if not sizes or len(sizes) != 4 or any(not isinstance(d, int) for d in sizes):
        return None
    return tuple(sizes[1:])


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    sha = file_sha256(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return Checkpoint(_flatten(load_file(str(path)), path), sha, "safetensors")
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    members = _torchscript_members(path)
    if members is not None:
        # torch.jit.trace stores its example inputs; restoring them (torch.jit.load's private
        # `_restore_shapes` flag) types forward's inputs with their shapes. Asked for only
        # when they are present: otherwise torch warns on stderr.
        traced = any(n.endswith("/traced_inputs.pkl") for n in members)
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": not the user's
                warnings.filterwarnings("ignore", r".*torch\.jit", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu", _restore_shapes=traced)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: cannot read TorchScript archive ({exc})") from None
        return Checkpoint(_flatten(module.state_dict(), path), sha, "torchscript", module,
                          _traced_input_shape(module) if traced else None)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses both a pickled class ("Unsupported global") and plain junk.
        if "unsupported global" not in str(exc).lower():
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                                  "(not a pickle torch.load can read safely)") from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: holds pickled Python objects that weights_only loading refuses "
                "(probably a whole model); save its state_dict, or pass --trust-pickle if you "
                "trust the file's author"
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure of arbitrary pickle is the file's
            raise CheckpointError(f"{path}: cannot unpickle ({exc})") from None
        module = obj if isinstance(obj, torch.nn.Module) else None
        return Checkpoint(_flatten(obj, path), sha, "pickled_module", module)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    return Checkpoint(_flatten(obj, path), sha, "state_dict")
