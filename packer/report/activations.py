"""Activation maps (the seed's display_activations): what one image looks like after each ReLU.

ReLUs are found by intercepting the call, not by module type: torchvision calls one nn.ReLU
module several times per block, and the CIFAR ResNets call F.relu with no module at all. A
TorchFunctionMode sees every relu however it is called; module hooks name where it happened.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.overrides import TorchFunctionMode

from packer.report.kernels import mosaic
from packer.report.models import ModelView
from packer.report.style import Margins, grid_figure, new_figure, sequential
from runtime.data import (
    build_transform,
    image_folder_dataset,
    imagenet_classes,
    imagenet_dataset,
)
from runtime.errors import DataError
from runtime.format.records import InputSpec

RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                            torch.Tensor.relu_})
CELLS_PER_PAGE = 12
ACT_COLUMNS = 4
ACT_MARGINS = Margins(left=0.3, right=0.3, top=0.9, bottom=0.35, wgap=0.45, hgap=0.75)


def test_images(data: Path) -> tuple[Path, list[str]]:
    """The first test image of a data folder (`test/` for CIFAR, `val/` for ImageNet, or the
    folder itself) and the class names its labels stand for."""
    folder = next((data / s for s in ("test", "val") if (data / s).is_dir()), data)
    try:  # ImageNet wnid folders: label with the 1k index and the human-readable name
        dataset = imagenet_dataset(folder)
        return Path(dataset.samples[0][0]), [name for _, name in imagenet_classes()]
    except DataError:
        dataset = image_folder_dataset(folder)
        return Path(dataset.samples[0][0]), list(dataset.classes)


def open_image(path: Path) -> Image.Image:
    """The decoded image, or one line saying why it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def model_input(img: Image.Image, spec: InputSpec) -> tuple[torch.Tensor, np.ndarray]:
    """(the model's input [1, C, H, W], the same image as RGB pixels in [0, 1] for display)."""
    x = build_transform(spec)(img)
    mean = torch.tensor(spec.mean).reshape(-1, 1, 1)
    std = torch.tensor(spec.std).reshape(-1, 1, 1)
    pixels = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x.unsqueeze(0), pixels


class _ReluRecorder(TorchFunctionMode):
    def __init__(self, scope: list[str]) -> None:
        super().__init__()
        self.scope = scope
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in RELU_FUNCTIONS:
            # In-place relus are followed by in-place adds in some blocks: keep a copy.
            self.outputs.append((self.scope[-1], out.detach().clone()))
        return out


def capture_relus(module: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]],
                                                                torch.Tensor]:
    """Every ReLU output for input `x`, named by the module it ran in, and the model output."""
    top = type(module).__name__
    scope = [top]
    names = {id(m): n or top for n, m in module.named_modules()}

    def enter(m, _inputs):
        scope.append(names[id(m)])

    def leave(m, _inputs, _output):
        scope.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in module.modules()]
    hooks += [m.register_forward_hook(leave) for m in module.modules()]
    recorder = _ReluRecorder(scope)
    try:
        with torch.inference_mode(), recorder:
            logits = module(x)
    finally:
        for h in hooks:
            h.remove()
    seen = Counter(name for name, _ in recorder.outputs)
    calls: Counter[str] = Counter()
    named = []
    for name, out in recorder.outputs:
        calls[name] += 1
        label = name if name.endswith("relu") else f"{name} relu"
        named.append((label + (f" #{calls[name]}" if seen[name] > 1 else ""), out[0]))
    return named, logits


def input_figure(image: Path, pixels: np.ndarray, predictions: list[tuple[str, str]]
                 ) -> tuple[str, str, Figure]:
    fig = new_figure(4.4, 5.0)
    ax = fig.subplots()
    ax.imshow(pixels, interpolation="nearest")
    ax.set_xlabel("x (pixels of the model's input)")
    ax.set_ylabel("y (pixels)")
    ax.set_title("\n".join(f"{label}: {pred}" for label, pred in predictions), fontsize=8)
    fig.suptitle(f"Input image {image.parent.name}/{image.name}")
    return ("activations_input", f"The input image {image} after the model's resize, crop "
            f"and normalisation (shown un-normalised), with each model's top prediction.", fig)


def prediction(logits: torch.Tensor, class_names: Sequence[str]) -> str:
    probs = torch.softmax(logits[0].float(), 0)
    p, k = probs.max(0)
    name = f" ({class_names[int(k)]})" if len(class_names) == probs.numel() else ""
    return f"class {int(k)}{name}, p={float(p):.2f}"


def activation_pages(views: list[ModelView], relus: list[list[tuple[str, torch.Tensor]]],
                     max_channels: int) -> Iterator[tuple[str, str, Figure]]:
    """Pages of ReLU outputs; with two models each ReLU gets a pair of cells on one scale.
    The channels shown are the most active ones of the last model (the compressed one)."""
    per_page = CELLS_PER_PAGE // len(views)
    count = len(relus[-1])
    for page in range(math.ceil(count / per_page)):
        layers = range(page * per_page, min(count, (page + 1) * per_page))
        fig = _activation_page(views, relus, layers, max_channels)
        first, last = layers[0] + 1, layers[-1] + 1
        which = f"ReLUs {first}-{last}" if last > first else f"ReLU {first}"
        fig.suptitle(f"Activations after {which} of {count}: "
                     + " vs ".join(v.label for v in views))
        yield (f"activations_{page + 1:02d}",
               f"Activation maps after {which} of {count}: the most active channels "
               f"(largest mean), one tile each; black is 0.", fig)


def _activation_page(views: list[ModelView], relus: list[list[tuple[str, torch.Tensor]]],
                     layers: range, max_channels: int) -> Figure:
    rows = math.ceil(len(layers) * len(views) / ACT_COLUMNS)
    fig, axes = grid_figure(rows, ACT_COLUMNS, 2.5, 2.5, ACT_MARGINS)
    axes = axes.ravel()
    cell = 0
    for layer in layers:
        name, ref = relus[-1][layer]
        channels = ref.shape[0]
        keep = torch.argsort(ref.mean(dim=(1, 2)), descending=True, stable=True)[:max_channels]
        maps = [r[layer][1][keep].numpy() for r in relus]
        vmax = max(float(m.max()) for m in maps) or 1.0
        for view, m in zip(views, maps, strict=True):
            ax = axes[cell]
            cell += 1
            side = math.ceil(math.sqrt(m.shape[0]))
            ax.imshow(mosaic(m, side), cmap=sequential(), vmin=0, vmax=vmax,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}\n{view.label}" if len(views) > 1 else name, fontsize=8)
            ax.set_xlabel(f"{m.shape[0]} of {channels} channels, {m.shape[1]}x{m.shape[2]}; "
                          f"max {vmax:.2f}", fontsize=7)
    for ax in axes[cell:]:
        ax.set_visible(False)
    return fig
