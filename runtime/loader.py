"""`runtime.load`: a packed file -> a ready nn.Module, without the user's model code."""

from __future__ import annotations

import json
import os

import onnx
import torch
from torch import nn

from runtime import zoo
from runtime.activation_quant import apply_activation_quant
from runtime.decode import decode_state_dict
from runtime.errors import ArchitectureError, ConfigError, UnsupportedVersion
from runtime.format.reader import open_packed
from runtime.format.records import ModelRecord
from runtime.gating import apply_gates


def build_module(model: ModelRecord) -> nn.Module:
    """Instantiate the file's architecture from the allow-list (never importing by name),
    with the file's channel gates installed: the module its tensors bind to."""
    arch = model.architecture
    if arch.kind != "builder":
        raise UnsupportedVersion(f"architecture kind {arch.kind!r} has no torch builder")
    kwargs = json.loads(arch.kwargs_json)
    if not isinstance(kwargs, dict):
        raise ArchitectureError("builder kwargs in the file are not a JSON object")
    return apply_gates(zoo.build(arch.builder, kwargs), model.channel_gates)


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         backend: str = "torch") -> nn.Module | onnx.ModelProto:
    """Load a packed file as a torch.nn.Module in eval mode on `device` (backend "torch"),
    or as a standalone fp32 onnx.ModelProto with its weights inline (backend "onnx").

    Safe on untrusted files: no Python object is deserialised or imported by name; every size is
    checked before allocation. Each call opens the file on its own, so concurrent loads
    from threads or processes do not share state. Activation quantizers stored in the file
    (DoReFa's bits_a) are installed on the module, and so are channel gates (FBS), so it
    computes what was trained.
    """
    if backend == "onnx":
        from runtime.onnx.graph import fp32_graph  # the ONNX backend imports this module

        return fp32_graph(path)
    if backend != "torch":
        raise ConfigError(f"unknown backend {backend!r}; choose torch or onnx")
    with open_packed(path) as packed:
        if packed.model.architecture.kind == "onnx_graph":
            if packed.model.channel_gates:
                raise ArchitectureError(
                    f"{path}: the file gates channels (feature 'channel_gating'), which the "
                    "runtime applies to zoo architectures only, not to a model stored as an "
                    "ONNX graph")
            from runtime.onnx.module import load_graph_module

            return load_graph_module(path, torch.device(device))
        module = build_module(packed.model)
        state_dict = decode_state_dict(packed)
        activation_quant = packed.model.activation_quant
    expected = module.state_dict()
    problems = [k for k in expected if k not in state_dict or
                expected[k].shape != state_dict[k].shape]
    unexpected = [k for k in state_dict if k not in expected]
    if problems or unexpected:
        raise ArchitectureError(
            f"{path}: tensors do not fit architecture {packed.model.architecture.builder} "
            f"({len(problems)} missing or misshapen, {len(unexpected)} unexpected)")
    module.load_state_dict(state_dict, strict=True, assign=True)
    apply_activation_quant(module, activation_quant)
    return module.to(device).eval()
