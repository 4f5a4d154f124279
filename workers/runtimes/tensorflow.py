"""TensorFlow SavedModels on the CPU, through their serving signature.

The model's files are a SavedModel directory (`saved_model.pb` and `variables/`), as
`tf.saved_model.save` or Keras' `model.export` write it, or a directory of numbered versions
of one (TensorFlow Serving's layout: the highest number is served). The signature called is
`serving_default` (the one TensorFlow Serving calls when a request names none), or the only
signature when the model has one by another name. Its inputs are the model's inputs (names,
datatypes, shapes checked per request before batching), its outputs the outputs a request may
name; a request naming none gets them all.

Importing TensorFlow costs seconds and hundreds of MB: this module is imported only when a
worker first loads a model of this runtime (workers/runtimes/__init__.py). Each worker process
runs TensorFlow's ops on one thread, as the ONNX runtime: Mesh gets throughput from batching
and processes, and several workers share a host's cores.

A SavedModel's graph is code TensorFlow runs; register only models you trust (as joblib files).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InferenceError, InvalidInput, MeshError, ModelLoadFailed
from mesh.models import ModelInfo

from .base import Loaded, Runtime, TensorSpec, load_failed

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: its C++ logs flood a worker's
import tensorflow as tf  # noqa: E402

try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TensorFlow already initialized in this process (by the user's code): leave it
    pass

SIGNATURE = "serving_default"

_TF_TO_V2 = {
    tf.bool: "BOOL", tf.uint8: "UINT8", tf.uint16: "UINT16", tf.uint32: "UINT32", tf.uint64: "UINT64",
    tf.int8: "INT8", tf.int16: "INT16", tf.int32: "INT32", tf.int64: "INT64",
    tf.float16: "FP16", tf.float32: "FP32", tf.float64: "FP64", tf.string: "BYTES",
}  # fmt: skip


@dataclass
class TensorFlowModel:
    root: Any  # the loaded SavedModel: the signature's function lives only as long as it
    fn: Any
    inputs: dict[str, Any]  # name -> tf.TensorSpec
    output_names: list[str]


class TensorFlowRuntime(Runtime):
    name = "tensorflow"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        directory = saved_model_dir(Path(path))
        try:
            root = tf.saved_model.load(str(directory))
        except Exception as e:
            raise load_failed(self.name, directory, e, "not a SavedModel directory, or a damaged one") from e
        signatures = dict(getattr(root, "signatures", {}) or {})
        if SIGNATURE in signatures:
            fn = signatures[SIGNATURE]
        elif len(signatures) == 1:
            fn = next(iter(signatures.values()))
        else:
            raise ModelLoadFailed(
                f"cannot load tensorflow model from {directory}: it has no {SIGNATURE!r} signature "
                f"(signatures: {sorted(signatures) or 'none'}); save it with "
                f"signatures={{'{SIGNATURE}': ...}}"
            )
        _, kw_inputs = fn.structured_input_signature
        outputs = fn.structured_outputs
        if not isinstance(outputs, dict):
            raise ModelLoadFailed(f"cannot load tensorflow model from {directory}: its signature's outputs are not named")
        signature = [_spec(n, s) for n, s in kw_inputs.items()]
        model = TensorFlowModel(root=root, fn=fn, inputs=dict(kw_inputs), output_names=list(outputs))
        # the variables dominate a SavedModel's memory, and they are its variables/ files
        size = known_size or max(_tree_size(directory), 1)
        return Loaded(
            model=model,
            size_bytes=size,
            signature=signature or None,
            runtime=self,
            outputs=[_spec(n, s) for n, s in outputs.items()],
        )

    def predict(
        self, model: TensorFlowModel, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if not inputs:
            raise InvalidInput("the request has no inputs")
        names = list(model.inputs)
        if len(names) == 1 and len(inputs) == 1:
            inputs = {names[0]: next(iter(inputs.values()))}
        missing = [n for n in names if n not in inputs]
        if missing or len(inputs) != len(names):
            raise InvalidInput(f"the model expects inputs {names}; got {list(inputs)}")
        first = next(iter(inputs.values()))
        if np.ndim(first) == 0:
            raise InvalidInput("inputs need a first (batch) dimension; got a scalar")
        try:
            feed = {n: tf.constant(_as_dtype(inputs[n], model.inputs[n].dtype), dtype=model.inputs[n].dtype)
                    for n in names}  # fmt: skip
            result = model.fn(**feed)
            wanted = list(outputs) if outputs else model.output_names
            unknown = [w for w in wanted if w not in result]
            if unknown:
                raise InvalidInput(f"the model has no output {', '.join(map(repr, unknown))}; it offers {model.output_names}")
            out = {w: _to_numpy(result[w]) for w in wanted}
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(f"tensorflow predict failed: {type(e).__name__}: {str(e)[:500]}") from e
        return self._batched_outputs(self.name, out, int(np.shape(first)[0]))

    def held(self, model: TensorFlowModel) -> Any:
        return model.root

    def unload(self, model: TensorFlowModel) -> None:
        model.fn = model.root = None


def saved_model_dir(path: Path) -> Path:
    """The SavedModel directory at `path`: itself, or its highest numbered version."""
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
        if versions:
            return versions[-1][1]
        raise ModelLoadFailed(
            f"cannot load tensorflow model from {path}: no saved_model.pb in it nor in a numbered version directory"
        )
    raise ModelLoadFailed(f"cannot load tensorflow model from {path}: a SavedModel is a directory")


def _spec(name: str, spec: Any) -> TensorSpec:
    shape = [-1 if d is None else int(d) for d in (spec.shape.as_list() if spec.shape.rank is not None else [None])]
    return TensorSpec(name=str(name), datatype=_TF_TO_V2.get(spec.dtype), shape=shape or [-1])


def _as_dtype(arr: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype == tf.string:
        flat = [v.encode() if isinstance(v, str) else v for v in np.asarray(arr, dtype=object).ravel()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(np.shape(arr))
    return np.asarray(arr).astype(dtype.as_numpy_dtype, copy=False)


def _to_numpy(t: Any) -> np.ndarray:
    arr = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    if arr.dtype.kind == "O":  # tf.string -> bytes; V2 BYTES in JSON are text
        arr = np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object])(arr)
    return arr


def _tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


__all__ = ["SIGNATURE", "TensorFlowModel", "TensorFlowRuntime", "saved_model_dir"]
