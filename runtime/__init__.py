"""weightpack's runtime: read packed files and run them, with nothing of the packer needed.

    import runtime
    model = runtime.load("model.fb")      # torch.nn.Module in eval mode
    sess = runtime.session("model.fb")    # an onnxruntime InferenceSession: TensorRT > CUDA > CPU
    labels = runtime.class_names("model.fb")  # output index -> class name, or None

The names below are imported on first use (PEP 562), so `import runtime` and the `runtime`
command's --help cost no torch, onnx or onnxruntime import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from runtime.errors import WeightpackError

__version__ = "0.1.0"

_LAZY = {
    "PackedFile": "runtime.format.reader",
    "open_packed": "runtime.format.reader",
    "class_names": "runtime.labels",
    "load": "runtime.loader",
    "session": "runtime.onnx",
}
__all__ = ["PackedFile", "WeightpackError", "__version__", "class_names", "load", "open_packed",
           "session"]

if TYPE_CHECKING:
    from runtime.format.reader import PackedFile, open_packed
    from runtime.labels import class_names
    from runtime.loader import load
    from runtime.onnx import session


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
