"""CIFAR ResNets of He et al. (2016) with option-A shortcuts.

Layout and parameter names follow Idelbayev's ``pytorch_resnet_cifar10`` so its public
checkpoints (and the fine-tuned ones in the shared assets) load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels; no parameters, no state."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv3x3(3->16) + three stages of ``n`` blocks (16/32/64 channels) + global pool + linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self._in_planes = 16
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            # Same initialisation as the reference implementation, for anyone training from zero.
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self._in_planes, planes, s))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27M parameters)."""
    return CifarResNet(3, num_classes)


def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 0.46M parameters)."""
    return CifarResNet(5, num_classes)


def cifar_resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (7 blocks per stage, 0.66M parameters)."""
    return CifarResNet(7, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85M parameters)."""
    return CifarResNet(9, num_classes)
