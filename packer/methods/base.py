"""What a compression method is: named options, and a map from weights to compressed forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from packer.config import MethodConfig, Option
from runtime.tensors import CompressedTensor


@dataclass
class CompressJob:
    """Everything a method may use. Methods never see files or coders."""

    model: torch.nn.Module  # built and loaded with the source weights
    state_dict: dict[str, torch.Tensor]
    targets: list[str]  # weight names to compress (Conv/Linear weights not set to 'none')
    config: MethodConfig
    seed: int = 0
    progress: bool = True
    data: Any = None  # data options for methods that calibrate or train


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    trains: ClassVar[bool] = False  # takes training data (--cifar10/--imagenet/--data)

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        raise NotImplementedError


class PerTensorMethod(Method):
    """A post-training method that treats each weight on its own."""

    def compress(self, job: CompressJob) -> dict[str, CompressedTensor]:
        out: dict[str, CompressedTensor] = {}
        bar = tqdm(job.targets, desc=self.name, unit="tensor", disable=not job.progress,
                   leave=False)
        for name in bar:
            out[name] = self.compress_tensor(name, job.state_dict[name],
                                             job.config.for_tensor(name))
        return out

    def compress_tensor(self, name: str, weight: torch.Tensor,
                        opts: dict[str, Any]) -> CompressedTensor:
        raise NotImplementedError
