"""Test helpers: pack in-memory compressed tensors into a file without a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from packer.compress import compressible_weights
from packer.config import collect_settings
from packer.encode import DataSection, Encoder
from packer.methods.base import CompressJob, Method
from packer.writer import write_packed
from runtime.format.records import ArchitectureRecord, ModelRecord
from runtime.tensors import CompressedTensor
from runtime.zoo.specs import CIFAR_SPEC


def pack_tensors(path: Path, tensors: dict[str, CompressedTensor], coder: str = "auto",
                 alignment: int = 64, builder: str = "cifar_resnet20") -> ModelRecord:
    data = DataSection(alignment)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in tensors.items())
    model = ModelRecord(
        producer="weightpack test", method="test", method_config_json='{"k":1}',
        source_sha256="0" * 64, architecture=ArchitectureRecord("builder", builder, "{}"),
        input=CIFAR_SPEC, num_classes=10, tensors=records, fp32_bytes=1024,
        class_names=("a", "b"),
    )
    write_packed(path, model, data)
    return model


def method_job(method_cls: type[Method], model: nn.Module, *sets: str,
               data: Any = None) -> tuple[Any, CompressJob]:
    """A method and the job `packer compress` would give it for `model` with `--set`s."""
    method = method_cls()
    cfg = method.build_config(collect_settings({}, list(sets)))
    return method, CompressJob(model, model.state_dict(), compressible_weights(model), cfg,
                               progress=False, data=data)
