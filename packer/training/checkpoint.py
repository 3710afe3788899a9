"""Resumable training state: one file, written atomically, refused for other settings.

A checkpoint records the *settings* it was written under (the model's tensor names and
shapes, the training configuration, the method's options, the seed) beside the state. Loading
compares them with the current run's and refuses, naming what changed, unless they are the
same: resuming a run under a different learning rate or distillation setting would silently
mix two experiments. Where the file lives and whether to resume are not settings.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.atomic import atomic_write
from runtime.distributed import rank
from runtime.errors import ConfigError

MAX_CHANGES_SHOWN = 4


def model_signature(model: nn.Module) -> list[list[Any]]:
    """The model's state names and shapes: what a checkpoint's tensors must fit."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def _plain(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists, paths strings), so settings
    compare equal before and after a round trip through the file."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Checkpoint:
    """The state of a run at `path` (None: no checkpointing), tied to its `settings`.

    Only the main process writes (every process of a torchrun group holds the same state);
    every process can read.
    """

    def __init__(self, path: str | Path | None, settings: Mapping[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.settings = _plain(dict(settings))

    def exists(self) -> bool:
        return self.path is not None and self.path.is_file()

    def save(self, state: Mapping[str, Any]) -> None:
        """Write `state` (tensors, numbers, strings, lists and dicts of them) atomically."""
        if self.path is None or rank() != 0:
            return
        buffer = io.BytesIO()
        torch.save({**state, "settings": json.dumps(self.settings, sort_keys=True)}, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, [buffer.getvalue()])

    def load(self) -> dict[str, Any]:
        """The saved state, after checking it was written under the same settings."""
        if self.path is None:
            raise ConfigError("resuming needs a checkpoint path")
        if not self.path.is_file():
            raise ConfigError(f"cannot resume: checkpoint {self.path} not found")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for damaged or foreign files
            raise ConfigError(f"cannot resume from {self.path}: "
                              f"{str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict) or not isinstance(state.get("settings"), str):
            raise ConfigError(f"cannot resume from {self.path}: it records no settings (not a "
                              f"checkpoint of this weightpack); delete it to start again")
        saved = json.loads(state["settings"])
        changes = differences(saved, self.settings)
        if changes:
            shown = "; ".join(changes[:MAX_CHANGES_SHOWN])
            more = len(changes) - MAX_CHANGES_SHOWN
            raise ConfigError(
                f"cannot resume from {self.path}: it was written for another model or "
                f"configuration ({shown}{f'; and {more} more' if more > 0 else ''}); use the "
                f"same settings, or delete the checkpoint to start again")
        return state


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """What changed between two settings documents, one `key: old -> new` line each."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{path}: not set -> {_short(new[key])}")
            elif key not in new:
                out.append(f"{path}: {_short(old[key])} -> not set")
            else:
                out += differences(old[key], new[key], path)
        return out
    if old == new:
        return []
    if where == "model":
        return ["model: its tensor names or shapes differ"]
    return [f"{where or 'settings'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
