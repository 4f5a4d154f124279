"""scikit-learn models saved with joblib (`joblib.dump(estimator, "model.joblib")`).

joblib files are pickles: loading one runs code, so only register model files you trust. That
is the model file on local disk, never the wire (requests and results are JSON). The same holds
for the reload snapshots a worker writes of them into the host's disk cache
(workers/snapshots.py): keep MESH_DISK_CACHE_DIR writable by the workers' user only.
"""

from __future__ import annotations

import pickle
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

from mesh.errors import InferenceError, InvalidInput, MeshError
from mesh.models import ModelInfo
from mesh.protocol.tensors import dtype_to_datatype

from .base import Loaded, Runtime, TensorSpec, estimate_nbytes, load_failed, resolve_model_file
from .tabular import check_tabular, tabular_input, tabular_signature, unnamed

_SUFFIXES = (".joblib", ".pkl", ".pickle")


class SklearnRuntime(Runtime):
    """One input tensor [rows, features] (or one per column, for a model trained on a
    DataFrame) -> the outputs asked for, each `estimator.<output>(X)`; "predict" by default."""

    name = "sklearn"

    def __init__(self) -> None:
        # loaded model -> whether a request's NaN or infinity is refused before batching
        # (`refuses_non_finite`); weak: an evicted model leaves with its entry
        self._refuses: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

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
        n_features, names = _features(model)
        # Pipelines may take strings or mixed columns, so the datatype is left open.
        signature = tabular_signature(n_features, names)
        return Loaded(model=model, size_bytes=size, signature=signature, runtime=self,
                      outputs=_output_specs(model), default_outputs=["predict"])  # fmt: skip

    def check_inputs(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> None:
        n_features, names = _features(loaded.model)
        if not names:
            super().check_inputs(loaded, inputs)
        else:
            super().check_inputs(unnamed(loaded), inputs)  # scalars, rows that disagree
            check_tabular(self.name, inputs, n_features, names)
        if self.refuses_non_finite(loaded.model):
            # What the estimator's own check would refuse, refused here: alone and before
            # batching (its ValueError failed the batch, which was then split in halves until
            # the culprit predicted alone), and as what it is, the client's error (it was
            # INTERNAL, as any exception of a predict)
            for name, arr in inputs.items():
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise InvalidInput(
                        f"input {name!r} holds NaN or infinity, which {type(loaded.model).__name__} does not take"
                    )

    def refuses_non_finite(self, model: Any) -> bool:
        """Whether `model` refuses NaN and infinity in its input, as far as can be known
        (`_refuses_non_finite`), remembered per model."""
        try:
            known = self._refuses.get(model)
        except TypeError:  # unhashable, or not weakly referenceable: decided each time
            return _refuses_non_finite(model)
        if known is None:
            known = self._refuses[model] = _refuses_non_finite(model)
        return known

    def predict(
        self, model: Any, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = tabular_input(self.name, inputs, *_features(model))
        out = {}
        for name in outputs or ("predict",):
            method = getattr(model, name, None) if name in OUTPUTS else None
            if not callable(method):
                raise InvalidInput(f"the model has no output {name!r}; it offers {_offered(model)}")
            try:
                value = method(x)
                # a transform may give a scipy sparse matrix (a one-hot encoder's): V2 is dense
                out[name] = value.toarray() if hasattr(value, "toarray") else value
            except MeshError:
                raise
            except Exception as e:
                raise InferenceError(f"sklearn {name} failed: {type(e).__name__}: {e}") from e
        return self._batched_outputs(self.name, out, x.shape[0])


# The estimator methods a request may name as outputs (KServe V2 `outputs`), as MLServer's
# sklearn runtime offers predict and predict_proba (SeldonIO/MLServer runtimes/sklearn).
OUTPUTS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "transform")


def _refuses_non_finite(model: Any) -> bool:
    """One of scikit-learn's own estimators (a subclass elsewhere may treat NaN in its own
    predict), holding no other estimator (a pipeline's first step may impute NaN; what its
    tags say is its first step's), whose tags refuse NaN: its predict checks X with
    `check_array`'s default, which refuses NaN and infinity."""
    if not type(model).__module__.startswith("sklearn."):
        return False
    try:
        from sklearn.utils import get_tags  # scikit-learn >= 1.6

        if any(_holds_estimator(v) for v in model.get_params(deep=False).values()):
            return False
        return not get_tags(model).input_tags.allow_nan
    except Exception:  # an older scikit-learn, an odd estimator: left to its own check
        return False


def _holds_estimator(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_estimator(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_estimator(v) for v in value.values())
    return callable(getattr(value, "fit", None))


def _offered(model: Any) -> list[str]:
    # hasattr, not callable(getattr): sklearn hides a method a fitted model cannot run
    # (`available_if`: SVC(probability=False).predict_proba) by raising AttributeError
    return [n for n in OUTPUTS if hasattr(model, n)]


def _features(model: Any) -> tuple[int | None, list[str] | None]:
    n = getattr(model, "n_features_in_", None)
    n = int(n) if isinstance(n, (int, np.integer)) and n > 0 else None
    names = getattr(model, "feature_names_in_", None)
    return n, ([str(c) for c in names] if names is not None else None)


def _output_specs(model: Any) -> list[TensorSpec]:
    classes = getattr(model, "classes_", None)
    n_classes = len(classes) if isinstance(classes, np.ndarray) and classes.ndim == 1 else None
    specs = []
    for name in _offered(model):
        datatype, shape = "FP64", [-1, n_classes or -1]
        if name == "predict":
            datatype, shape = "FP64", [-1]
            if n_classes:
                try:
                    datatype = dtype_to_datatype(classes.dtype)
                except InvalidInput:
                    datatype = None
        elif name == "decision_function" and n_classes == 2:
            shape = [-1]
        elif name == "transform":
            shape = [-1, -1]
        specs.append(TensorSpec(name=name, datatype=datatype, shape=shape))
    return specs


def _hint(file: Path, exc: Exception) -> str:
    # Unpickling errors of a damaged file are cryptic (EOFError, KeyError: 0); say what they mean.
    if isinstance(exc, (ImportError, AttributeError)):
        return "the model needs a module or version that this worker does not have"
    if file.stat().st_size == 0:
        return "the file is empty"
    return "not a file written by joblib.dump, or a damaged one"
