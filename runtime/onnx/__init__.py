"""The ONNX backend: packed files as onnxruntime sessions and standalone .onnx exports.

    from runtime.onnx import session, export_onnx
    sess = session("model.fb")            # weights decoded once, injected from memory
    logits = sess(batch)                  # numpy NCHW float32 -> numpy logits
    logits = sess.run(None, {"input": batch})[0]   # the same: it is an InferenceSession
    export_onnx("model.fb", "model.onnx", compact=True)
"""

from runtime.onnx.export import export_onnx
from runtime.onnx.graph import (
    WeightSpec,
    export_module,
    external_weights,
    fill_weights,
    fp32_graph,
    weight_free,
)
from runtime.onnx.session import OnnxSession, make_session, providers_available, session

__all__ = [
    "OnnxSession",
    "WeightSpec",
    "export_module",
    "export_onnx",
    "external_weights",
    "fill_weights",
    "fp32_graph",
    "make_session",
    "providers_available",
    "session",
    "weight_free",
]
