"""`runtime.load`: a packed file -> a ready nn.Module, without the user's model code."""

from __future__ import annotations

import json
import os

import onnx
import torch
from torch import nn
from torch.nn.modules import module as module_globals
from torch.nn.modules.batchnorm import _NormBase

from runtime import zoo
from runtime.activation_quant import apply_activation_quant
from runtime.decode import decode_state_dict
from runtime.errors import ArchitectureError, ConfigError, UnsupportedVersion
from runtime.format.dtypes import torch_dtype
from runtime.format.reader import PackedFile, open_packed
from runtime.format.records import ModelRecord
from runtime.gating import apply_gates


def _builder_kwargs(model: ModelRecord) -> dict:
    arch = model.architecture
    if arch.kind != "builder":
        raise UnsupportedVersion(f"architecture kind {arch.kind!r} has no torch builder")
    kwargs = json.loads(arch.kwargs_json)
    if not isinstance(kwargs, dict):
        raise ArchitectureError("builder kwargs in the file are not a JSON object")
    return kwargs


def build_module(model: ModelRecord) -> nn.Module:
    """Instantiate the file's architecture from the allow-list (never importing by name),
    with the file's channel gates installed: the module its tensors bind to."""
    return apply_gates(zoo.build(model.architecture.builder, _builder_kwargs(model)),
                       model.channel_gates)


def build_skeleton(model: ModelRecord) -> nn.Module:
    """The file's architecture with its large tensors on the meta device (see
    zoo.build_skeleton), its channel gates installed and checked against it: enough to check
    the file against it before anything is allocated."""
    skeleton = zoo.build_skeleton(model.architecture.builder, _builder_kwargs(model))
    return apply_gates(skeleton, model.channel_gates)


def check_fits(module: nn.Module, packed: PackedFile) -> None:
    """Every tensor of the architecture is in the file with its shape and dtype, and the file
    has no other tensor. Runs on the index alone, before any tensor is decoded."""
    records = {t.name: t for t in packed.model.tensors}
    expected = module.state_dict()
    problems = [f"missing {k!r}" for k in expected if k not in records]
    problems += [f"unexpected {k!r}" for k in records if k not in expected]
    for name, want in expected.items():
        record = records.get(name)
        if record is None:
            continue
        if tuple(want.shape) != record.shape:
            problems.append(f"{name!r}: file {list(record.shape)} vs architecture "
                            f"{list(want.shape)}")
        elif torch_dtype(record.dtype) != want.dtype:
            problems.append(f"{name!r}: file {record.dtype} vs architecture "
                            f"{str(want.dtype).removeprefix('torch.')}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                           if len(problems) > 3 else "")
        raise ArchitectureError(
            f"{packed.path}: tensors do not fit architecture "
            f"{packed.model.architecture.builder!r}: {shown}")


def check_input_fits(module: nn.Module, packed: PackedFile) -> None:
    """The file's declared input shape runs through the architecture, so a file whose input
    spec the network cannot take (an image smaller than a pooling window, a wrong channel
    count) is refused at load, not by a torch error at the caller's first forward.

    The architecture's own default shape needs no check; any other runs one forward pass on
    the meta device (shapes only, nothing allocated; tens of milliseconds, hence the skip)."""
    model = packed.model
    if model.input.shape == zoo.input_spec(model.architecture.builder).shape:
        return
    shape = (1, *model.input.shape)
    # The skeleton keeps its small tensors on the CPU; all go to meta for this call only.
    on_meta = {name: t.to("meta") for name, t in [*module.named_parameters(),
                                                  *module.named_buffers()]}
    training = module.training
    try:
        with torch.no_grad():
            torch.func.functional_call(module.eval(), on_meta,
                                       (torch.empty(shape, device="meta"),))
    except (RuntimeError, ValueError, IndexError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(
            f"{packed.path}: the declared input {list(shape[1:])} does not fit architecture "
            f"{model.architecture.builder!r}: {message[:200]}") from None
    finally:
        module.train(training)


_PLAIN_LOADERS = frozenset({nn.Module._load_from_state_dict, _NormBase._load_from_state_dict})
"""Modules whose loading, with every key present, is setting each tensor in place: nn.Module's
own, and BatchNorm's (which only fills in a missing num_batches_tracked)."""


def assign_state(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state_dict, strict=True, assign=True)``, setting the tensors
    straight into each module's tables when that is all it would do: every module loads the
    plain way (no load or state_dict hooks, no extra state, no override but BatchNorm's) and
    the keys are exactly the module's. ``check_fits`` has matched the names, shapes and dtypes,
    so torch's per-module checks would find nothing; skipping them saves about as much time
    as building a ResNet-56's skeleton takes. Anything else goes through load_state_dict."""
    plan: list[tuple[dict, str, str, bool | None]] = []  # (table, name, key, requires_grad)
    stack = [("", module)]
    while stack:
        prefix, sub = stack.pop()
        cls = type(sub)
        if (sub._load_state_dict_pre_hooks or sub._load_state_dict_post_hooks
                or sub._state_dict_pre_hooks or sub._state_dict_hooks
                or cls._load_from_state_dict not in _PLAIN_LOADERS
                or cls.get_extra_state is not nn.Module.get_extra_state):
            module.load_state_dict(state_dict, strict=True, assign=True)
            return
        for name, param in sub._parameters.items():
            if param is not None:
                plan.append((sub._parameters, name, prefix + name, param.requires_grad))
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                plan.append((sub._buffers, name, prefix + name, None))
        stack.extend((f"{prefix}{name}.", child) for name, child in sub._modules.items()
                     if child is not None)
    if (len(plan) != len(state_dict) or any(key not in state_dict for _, _, key, _ in plan)
            or torch.__future__.get_swap_module_params_on_conversion()
            or module_globals._global_parameter_registration_hooks
            or module_globals._global_buffer_registration_hooks):  # setattr would run them
        module.load_state_dict(state_dict, strict=True, assign=True)
        return
    for table, name, key, requires_grad in plan:
        value = state_dict[key]
        table[name] = value if requires_grad is None else nn.Parameter(value, requires_grad)


def _has_meta_tensors(module: nn.Module) -> bool:
    """Whether a tensor the state_dict does not carry (a non-persistent buffer, a plain tensor
    attribute) is still a meta placeholder."""
    for sub in module.modules():
        tensors = [*sub._parameters.values(), *sub._buffers.values(),
                   *(v for v in vars(sub).values() if isinstance(v, torch.Tensor))]
        if any(t is not None and t.is_meta for t in tensors):
            return True
    return False


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         backend: str = "torch") -> nn.Module | onnx.ModelProto:
    """Load a packed file as a torch.nn.Module in eval mode on `device` (backend "torch"),
    or as a standalone fp32 onnx.ModelProto with its weights inline (backend "onnx").

    Safe on untrusted files: no Python object is deserialised or imported by name; every size is
    checked before allocation, and the tensors (channel-gate predictors included) are checked
    against the architecture (built without its large tensors) before any is decoded. Each
    call opens the file on its own, so concurrent loads from threads or processes do not share
    state. Activation quantizers stored in the file (DoReFa's bits_a) are installed on the
    module, and so are channel gates (FBS), so it computes what was trained.
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
        module = build_skeleton(packed.model)
        check_fits(module, packed)
        check_input_fits(module, packed)
        state_dict = decode_state_dict(packed)
        model = packed.model
    # Assigned, not copied: the decoded tensors take the meta placeholders' places.
    assign_state(module, state_dict)
    if _has_meta_tensors(module):  # a large tensor the builder derives, not stored: build it
        module = build_module(model)
        module.load_state_dict(state_dict, strict=True, assign=True)
    apply_activation_quant(module, model.activation_quant)
    if torch.device(device) != torch.device("cpu"):  # every tensor is on the CPU already
        module = module.to(device)
    return module.eval()
