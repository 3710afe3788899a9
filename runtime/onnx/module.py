"""A torch module around a stored ONNX graph, for architectures outside the zoo.

Files of kind `onnx_graph` carry a weight-free graph instead of a builder name, because the
runtime never imports a user's model code. `runtime.load` returns this wrapper so callers
still get an `nn.Module`; the computation runs in onnxruntime (the graph is data, not code).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from runtime.onnx.session import OnnxSession, session


class OnnxGraphModule(nn.Module):
    """Eval-only module: forward(x) runs the file's graph with its decoded weights."""

    def __init__(self, sess: OnnxSession):
        super().__init__()
        self.session = sess
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.session(x)

    def train(self, mode: bool = True) -> OnnxGraphModule:
        if mode:
            raise RuntimeError("a model loaded from an ONNX graph runs inference only")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"provider={self.session.provider}"


def load_graph_module(path: str | os.PathLike, device: torch.device) -> OnnxGraphModule:
    providers = ["CPUExecutionProvider"] if device.type == "cpu" else None
    return OnnxGraphModule(session(path, providers=providers))
