"""weightpack's runtime: read packed files and run them, with nothing of the packer needed.

    import runtime
    model = runtime.load("model.fb")      # torch.nn.Module in eval mode
    sess = runtime.session("model.fb")    # an onnxruntime InferenceSession: TensorRT > CUDA > CPU
    labels = runtime.class_names("model.fb")  # output index -> class name, or None
"""

from runtime.errors import WeightpackError
from runtime.format.reader import PackedFile, open_packed
from runtime.labels import class_names
from runtime.loader import load
from runtime.onnx import session

__version__ = "0.1.0"
__all__ = ["PackedFile", "WeightpackError", "__version__", "class_names", "load", "open_packed",
           "session"]
