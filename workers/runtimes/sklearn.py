"""scikit-learn models saved with joblib (`joblib.dump(estimator, "model.joblib")`).

joblib files are pickles: loading one runs code, so only register model files you trust. That
is the model file on local disk, never the wire (requests and results are JSON). The same holds
for the reload snapshots a worker writes of them into the host's disk cache
(workers/snapshots.py): keep MESH_DISK_CACHE_DIR writable by the workers' user only.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

from mesh.errors import InferenceError, InvalidInput, MeshError
from mesh.models import ModelInfo

from .base import Loaded, Runtime, TensorSpec, estimate_nbytes, load_failed, resolve_model_file

_SUFFIXES = (".joblib", ".pkl", ".pickle")


class SklearnRuntime(Runtime):
    """One input tensor [rows, features] -> one output "predict" = `estimator.predict(X)`."""

    name = "sklearn"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        file = resolve_model_file(self.name, path, _SUFFIXES)
        try:
            model = joblib.load(file)
        except Exception as e:  # unpickling can raise anything; the caller needs one type
            raise load_failed(self.name, file, e, _hint(file, e)) from e
        return self._loaded(model, file, known_size or max(estimate_nbytes(model), file.stat().st_size))

    # joblib unpickles with the pure-Python pickle implementation (to rebuild its numpy
    # arrays); the C unpickler reads the same model pickled by the worker 5-7x faster
    # (the gradient-boosting model of the multimodel bench: 22 ms -> 3 ms).
    def snapshot(self, model: Any) -> bytes:
        return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)

    def snapshot_tag(self) -> str:
        return f"python {sys.version_info[0]}.{sys.version_info[1]} sklearn {sklearn.__version__} numpy {np.__version__}"

    def restore(self, data: bytes, info: ModelInfo, known_size: int) -> Loaded:
        # from memory (workers/snapshots.py reads the file in one go, ahead of the load):
        # pickle.load on a file refills its buffer with a syscall every 8 KB, and a worker's
        # busy threads make each one wait for the GIL again
        model = pickle.loads(data)
        return self._loaded(model, f"the reload snapshot of {info.uri}", known_size)

    def _loaded(self, model: Any, file: Path | str, size: int) -> Loaded:
        if not callable(getattr(model, "predict", None)):
            raise load_failed(
                self.name, file, TypeError(f"{type(model).__name__} object has no predict method")
            )
        n_features = getattr(model, "n_features_in_", None)
        signature = None
        if isinstance(n_features, (int, np.integer)) and n_features > 0:
            # Pipelines may take strings or mixed columns, so the datatype is left open.
            signature = [TensorSpec(name="input_0", datatype=None, shape=[-1, int(n_features)])]
        return Loaded(model=model, size_bytes=size, signature=signature, runtime=self)

    def predict(self, model: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != 1:
            raise InvalidInput(
                f"sklearn models take exactly one input tensor [rows, features]; got {len(inputs)}"
            )
        ((name, x),) = inputs.items()
        x = np.asarray(x)
        # A lone feature vector is a convenience for direct callers; batched requests are 2-D
        # (check_inputs enforces that before batching).
        if x.ndim == 1 and x.shape[0] == getattr(model, "n_features_in_", None):
            x = x.reshape(1, -1)
        if x.ndim != 2:
            raise InvalidInput(
                f"input {name!r} has shape {list(x.shape)}; sklearn models take [rows, features]"
            )
        try:
            y = model.predict(x)
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(f"sklearn predict failed: {type(e).__name__}: {e}") from e
        return self._batched_outputs(self.name, {"predict": y}, x.shape[0])


def _hint(file: Path, exc: Exception) -> str:
    # Unpickling errors of a damaged file are cryptic (EOFError, KeyError: 0); say what they mean.
    if isinstance(exc, (ImportError, AttributeError)):
        return "the model needs a module or version that this worker does not have"
    if file.stat().st_size == 0:
        return "the file is empty"
    return "not a file written by joblib.dump, or a damaged one"
