"""A thin onnxruntime CPU session usable wherever a torch model is (Tensor in, Tensor out)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

__all__ = ["OrtModel", "session_options"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int | None = None, optimization: str = "all",
                    optimized_path: str | None = None) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads (None: ORT's default), optimization level,
    and optionally where to save the optimized graph (to see which nodes ORT fused)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[optimization]
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    return opts


class OrtModel:
    """Runs an ONNX model on onnxruntime's CPU provider; call it with an NCHW float tensor."""

    def __init__(self, model: onnx.ModelProto, threads: int | None = None,
                 optimization: str = "all", optimized_path: str | None = None) -> None:
        self.model = model
        self.session = ort.InferenceSession(
            model.SerializeToString(), session_options(threads, optimization, optimized_path),
            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.run(arr))
