"""ONNX models run with onnxruntime on the CPU.

Each session uses one intra-op thread: a worker host runs several worker processes on few
cores, and Mesh gets its throughput from batching and processes, not from threads fighting
over the same cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mesh.errors import InferenceError, InvalidInput, MeshError
from mesh.models import ModelInfo

from .base import Loaded, Runtime, TensorSpec, load_failed, resolve_model_file

# onnxruntime's type strings -> V2 datatypes (tensor element types only).
_ONNX_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_V2_TO_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@dataclass
class OnnxModel:
    session: ort.InferenceSession
    input_names: list[str]
    input_dtypes: list[Any]  # numpy dtype per input, None when the type is not a plain tensor
    output_names: list[str]


class OnnxRuntime(Runtime):
    name = "onnx"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        file = resolve_model_file(self.name, path, (".onnx",))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings would flood the worker log
        try:
            session = ort.InferenceSession(
                str(file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise load_failed(self.name, file, e) from e
        signature, dtypes = [], []
        for arg in session.get_inputs():
            datatype = _ONNX_TO_V2.get(arg.type)
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
            signature.append(TensorSpec(name=arg.name, datatype=datatype, shape=shape or [-1]))
            dtypes.append(_V2_TO_NUMPY[datatype] if datatype else None)
        model = OnnxModel(
            session=session,
            input_names=[a.name for a in session.get_inputs()],
            input_dtypes=dtypes,
            output_names=[o.name for o in session.get_outputs()],
        )
        # The initializers dominate an ONNX model's memory, and they are most of the file.
        size = file.stat().st_size
        outputs = [
            TensorSpec(name=o.name, datatype=_ONNX_TO_V2.get(o.type),
                       shape=[d if isinstance(d, int) and d >= 0 else -1 for d in (o.shape or [])] or [-1])
            for o in session.get_outputs()
        ]  # fmt: skip
        return Loaded(model=model, size_bytes=size, signature=signature, runtime=self, outputs=outputs)

    def predict(
        self, model: OnnxModel, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if not inputs:
            raise InvalidInput("the request has no inputs")
        if len(model.input_names) == 1 and len(inputs) == 1:
            arrays = {model.input_names[0]: next(iter(inputs.values()))}
        else:
            missing = [n for n in model.input_names if n not in inputs]
            if missing or len(inputs) != len(model.input_names):
                raise InvalidInput(
                    f"the model expects inputs {model.input_names}; got {list(inputs)}"
                )
            arrays = {n: inputs[n] for n in model.input_names}
        feeds = {}
        for (name, arr), dtype in zip(arrays.items(), model.input_dtypes, strict=True):
            arr = np.asarray(arr)
            feeds[name] = arr if dtype is None else arr.astype(dtype, copy=False)
        first = next(iter(feeds.values()))
        if first.ndim == 0:
            raise InvalidInput("inputs need a first (batch) dimension; got a scalar")
        rows = first.shape[0]
        try:
            names = list(outputs) if outputs else model.output_names
            results = model.session.run(names, feeds)
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(f"onnx predict failed: {type(e).__name__}: {e}") from e
        return self._batched_outputs(
            self.name, dict(zip(names, results, strict=True)), rows
        )

    def held(self, model: OnnxModel) -> Any:
        return model.session

    def unload(self, model: OnnxModel) -> None:
        # Dropping the last reference frees the session; make sure this holder is not it.
        model.session = None  # type: ignore[assignment]
