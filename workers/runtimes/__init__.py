"""Model runtimes, looked up by `ModelInfo.runtime`.

Runtime modules are imported on first use: a worker that never serves an ONNX model should not
pay for importing onnxruntime, xgboost, lightgbm or TensorFlow (seconds and hundreds of MB) (nor need them installed: they are extras,
`pip install mesh[xgboost]`, docs/runtimes.md).
"""

from __future__ import annotations

import importlib
import threading

from mesh.errors import ModelLoadFailed
from mesh.protocol.messages import RUNTIME_NAMES

from .base import Loaded, Runtime, TensorSpec, estimate_nbytes

_RUNTIMES: dict[str, tuple[str, str]] = {
    "sklearn": ("workers.runtimes.sklearn", "SklearnRuntime"),
    "onnx": ("workers.runtimes.onnx", "OnnxRuntime"),
    "python": ("workers.runtimes.python", "PythonRuntime"),
    "xgboost": ("workers.runtimes.xgboost", "XGBoostRuntime"),
    "lightgbm": ("workers.runtimes.lightgbm", "LightGBMRuntime"),
    "tensorflow": ("workers.runtimes.tensorflow", "TensorFlowRuntime"),
}

_instances: dict[str, Runtime] = {}
_lock = threading.Lock()  # the worker loads models from several threads


def get_runtime(name: str) -> Runtime:
    """The shared `Runtime` instance for `name`; unknown names raise `ModelLoadFailed`."""
    runtime = _instances.get(name)
    if runtime is not None:
        return runtime
    if name not in _RUNTIMES:
        raise ModelLoadFailed(f"unknown runtime {name!r}; known: {', '.join(RUNTIME_NAMES)}")
    with _lock:
        if name not in _instances:
            module, cls = _RUNTIMES[name]
            try:
                _instances[name] = getattr(importlib.import_module(module), cls)()
            except ImportError as e:
                raise ModelLoadFailed(
                    f"runtime {name!r} is not available on this worker: {type(e).__name__}: {e}"
                ) from e
        return _instances[name]


__all__ = ["RUNTIME_NAMES", "Loaded", "Runtime", "TensorSpec", "estimate_nbytes", "get_runtime"]
