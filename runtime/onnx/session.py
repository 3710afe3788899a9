"""onnxruntime sessions for packed files, with weights injected from memory.

The graph handed to onnxruntime is weight-free (a few tens of KB); the decoded weights go in
through `SessionOptions.add_external_initializers`, so nothing is serialised twice and no
temporary file is written. GPU providers are tried first and fall back to CPU with one warning.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch  # also loads the torch wheel's CUDA/cuDNN libraries, which CUDA EPs need

from runtime.errors import ArchitectureError, WeightpackError
from runtime.format.reader import open_packed
from runtime.onnx.graph import check_weights, external_weights, graph_and_weights

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
ORT_ERRORS = tuple(v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
                   if isinstance(v, type) and issubclass(v, Exception))
"""onnxruntime's own exception types (its pybind module defines them outside any hierarchy)."""


def providers_available() -> list[str]:
    """The providers weightpack can use in this onnxruntime build, best first."""
    available = set(ort.get_available_providers())
    return [p for p in PREFERENCE if p in available]


def _gpu_visible() -> bool:
    """Whether trying a GPU provider can succeed; avoids onnxruntime's load errors otherwise."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not stop CPU inference
        return False


def _chain(providers: Sequence[str] | None) -> list[str]:
    """Providers to try, in order, always ending with CPU."""
    if providers is None:
        wanted = [p for p in providers_available() if p != CPU] if _gpu_visible() else []
    else:
        unknown = [p for p in providers if p not in PREFERENCE]
        if unknown:
            raise WeightpackError(f"unknown execution provider {unknown[0]!r}; choose from "
                                  f"{', '.join(PREFERENCE)}")
        wanted = [p for p in providers if p != CPU]
    return [*dict.fromkeys(wanted), CPU]


def make_session(
    model: onnx.ModelProto,
    initializers: dict[str, np.ndarray] | None = None,
    providers: list[str] | None = None,
    *,
    threads: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
) -> tuple[OnnxSession, str]:
    """An InferenceSession (an OnnxSession) for `model` and the provider it actually runs on.

    `initializers` supplies the weights of a weight-free graph (see graph.weight_free) from
    memory; the arrays stay referenced by the returned session, whose lifetime they must
    outlive. `providers=None` prefers TensorRT > CUDA > CPU (GPUs only when one is visible);
    a GPU provider that fails to start falls back to CPU with one RuntimeWarning.
    `threads` sets onnxruntime's intra-op threads (None: its default, one per core).
    `optimized_model_path` makes onnxruntime save its optimised graph there (for checks).
    """
    specs = external_weights(model)
    initializers = initializers or {}
    check_weights(specs, initializers)
    # extras would fail ORT; np.require keeps 0-d weights 0-d (ascontiguousarray makes them 1-d)
    arrays = {n: np.require(initializers[n], requirements="C") for n in specs}
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    try:
        data = model.SerializeToString()
    except ValueError:
        raise WeightpackError("the ONNX graph is over protobuf's 2 GiB limit") from None

    def options() -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # onnxruntime's warnings would bypass Python's
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if optimized_model_path is not None:
            opts.optimized_model_filepath = os.fspath(optimized_model_path)
        if arrays:
            opts.add_external_initializers(list(arrays), values)
        return opts

    chain = _chain(providers)
    failed: list[str] = []
    for i, provider in enumerate(chain[:-1]):
        try:
            sess = OnnxSession(data, options(), providers=chain[i:], enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own pybind types
            failed.append(f"{provider} ({_first_line(exc)})")
            continue
        used = sess.get_providers()[0]
        if used == provider:
            return sess._ready(arrays, values), used
        failed.append(f"{provider} (did not start)")
    try:
        sess = OnnxSession(data, options(), providers=[CPU], enable_fallback=0)
    except Exception as exc:
        raise ArchitectureError(f"onnxruntime rejects the graph: {_first_line(exc)}") from None
    if failed:
        warnings.warn(f"onnxruntime could not start {'; '.join(failed)}: running on {CPU}",
                      RuntimeWarning, stacklevel=2)
    return sess._ready(arrays, values), sess.get_providers()[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip()[:300] if text else type(exc).__name__


class OnnxSession(ort.InferenceSession):
    """onnxruntime's own InferenceSession, whole (`run(None, {name: x})`, `get_inputs()`,
    `get_outputs()`, `get_providers()`, `run_with_iobinding`, ...), so code written for
    onnxruntime takes it unchanged. Added: `sess(x)` maps an NCHW float batch to logits
    (numpy in, numpy out; torch in, torch out on x's device, so `runtime.evaluate` takes a
    session as its model), and `provider`, `input_name`, `output_name`, `build_seconds`."""

    provider: str
    input_name: str
    output_name: str
    build_seconds: float = 0.0

    def _ready(self, arrays: dict[str, np.ndarray], values: list[ort.OrtValue]) -> OnnxSession:
        # onnxruntime uses injected buffers in place: tie their lifetime to the session.
        self._weightpack_buffers = (arrays, values)
        self.provider = self.get_providers()[0]
        self.input_name = self.get_inputs()[0].name
        self.output_name = self.get_outputs()[0].name
        return self

    @classmethod
    def from_graph(cls, model: onnx.ModelProto, initializers: dict[str, np.ndarray] | None = None,
                   providers: list[str] | None = None, *, threads: int | None = None,
                   optimized_model_path: str | os.PathLike | None = None) -> OnnxSession:
        """A session over `model` (see make_session for the arguments)."""
        started = time.perf_counter()
        sess, _ = make_session(model, initializers, providers, threads=threads,
                               optimized_model_path=optimized_model_path)
        sess.build_seconds = time.perf_counter() - started
        return sess

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Logits for the batch `x` (run as contiguous float32)."""
        if isinstance(x, torch.Tensor):
            return torch.from_numpy(self(x.detach().cpu().numpy())).to(x.device)
        batch = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        try:
            return self.run([self.output_name], {self.input_name: batch})[0]
        except ORT_ERRORS as exc:  # a graph or weights onnxruntime accepted but cannot run
            raise WeightpackError(f"onnxruntime cannot run the model on a {list(batch.shape)} "
                                  f"batch: {_first_line(exc)}") from None

    def __repr__(self) -> str:
        return f"OnnxSession(provider={self.provider!r}, input={self.input_name!r})"


def session(path: str | os.PathLike, providers: list[str] | None = None, *, int8: bool = False,
            threads: int | None = None) -> OnnxSession:
    """Open a packed file as an onnxruntime InferenceSession; weights are injected from
    memory. `sess.run(None, {sess.input_name: x})` as with any session, or `sess(x)`.

    `int8=True` runs the file's 8-bit QDQ graph (its stored activation scales) in the form
    `runtime export --int8` writes for the provider: `--target onnxruntime` on the CPU,
    `--target tensorrt` where a GPU provider is tried. `threads`: onnxruntime's intra-op
    threads (None: its default, one per core).
    """
    if int8:
        from runtime.quant import int8_session  # runtime.quant builds on this module

        return int8_session(path, providers=providers, threads=threads)
    started = time.perf_counter()
    with open_packed(path) as packed:
        graph, weights = graph_and_weights(packed)
    sess = OnnxSession.from_graph(graph, weights, providers, threads=threads)
    sess.build_seconds = time.perf_counter() - started
    return sess


def gpu_chain(providers: Sequence[str] | None) -> bool:
    """Whether `providers` (None: the default preference) would try a GPU provider first."""
    return _chain(providers)[0] != CPU
