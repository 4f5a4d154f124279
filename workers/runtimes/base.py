"""The model runtime interface (after ModelMesh's model-runtime SPI: load / modelSize / unload).

A runtime turns a local model file into a `Loaded` model and runs batched predictions on it.
The worker owns everything else (placement, LRU, batching, queues), so a runtime stays small:

- `load(path, info)` returns the model, its size in bytes (for the LRU's capacity accounting)
  and, when it can tell, the signature of its inputs (for `check_inputs`). Every failure is a
  `ModelLoadFailed` whose message names the runtime, the path and the original error.
- `predict(model, inputs)` receives inputs that are already batched: the first dimension of
  every input is the batch rows, and every output's first dimension must equal those rows so
  the worker can split the results back per request.
- `check_inputs(loaded, inputs)` validates one request before it joins a batch, so one bad
  request is rejected alone instead of failing everyone it was batched with.
- Outputs (KServe V2 `outputs`): `Loaded.outputs` lists what the model can produce and
  `Loaded.default_outputs` what a request naming none gets; `predict(model, inputs, outputs)`
  computes only the named ones. `check_outputs` rejects a request naming one the model lacks,
  before batching.
"""

from __future__ import annotations

import abc
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import InferenceError, InvalidInput, ModelLoadFailed
from mesh.models import ModelInfo, ModelSignature, TensorMetadata
from mesh.protocol.tensors import DATATYPE_TO_DTYPE, Datatype, dtype_to_datatype


class TensorSpec(BaseModel):
    """One input a model expects. `shape` uses -1 for "any"; the first dimension is the batch."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    datatype: Datatype | None = None  # None: any datatype
    shape: list[int] = Field(min_length=1)


@dataclass
class Loaded:
    model: Any
    size_bytes: int
    signature: list[TensorSpec] | None  # the inputs the model expects; None if unknown
    runtime: Runtime
    # the outputs the model can produce (None: unknown, whatever predict returns), and those a
    # request that names none gets (None: all that predict returns)
    outputs: list[TensorSpec] | None = None
    default_outputs: list[str] | None = field(default=None)


class Runtime(abc.ABC):
    name: ClassVar[str]
    # How many loads of this runtime a worker may run at once (ModelMesh's loadingConcurrency).
    loading_concurrency: ClassVar[int] = 1

    @abc.abstractmethod
    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        """Load the model at `path`; raise `ModelLoadFailed` with a clear message on failure.

        `known_size`: the size this same model measured at an earlier load (models are
        immutable), given on reloads. A runtime that estimates its size by walking the loaded
        objects (sklearn: about a quarter of the load) reports it instead of walking again.
        """

    # Fast reloads (workers/snapshots.py). A runtime whose load is slow Python work may write a
    # loaded model as bytes that `restore` reads back much faster; the worker keeps them in
    # the host's disk cache. Default: no snapshots.
    def snapshot(self, model: Any) -> bytes | None:
        """The loaded model as bytes for `restore`, or None when this runtime has none."""
        return None

    def snapshot_tag(self) -> str:
        """What a snapshot depends on besides the model's files (library versions): a
        snapshot written under another tag is never read."""
        return ""

    def restore(self, data: bytes, info: ModelInfo, known_size: int) -> Loaded:
        """The model from bytes `snapshot` returned, for a model whose size is known."""
        raise NotImplementedError(f"runtime {self.name!r} has no snapshots")

    @abc.abstractmethod
    def predict(
        self, model: Any, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; every output's first dimension equals the inputs' batch rows.

        `outputs`: the names the batch's requests asked for (all of them ask for the same; the
        worker groups them), None for the model's default outputs.
        """

    def check_outputs(self, loaded: Loaded, wanted: Sequence[str]) -> None:
        """Reject one request naming outputs the model cannot produce (before batching)."""
        if not wanted:
            raise InvalidInput("the request's outputs list is empty; omit it for the default outputs")
        if len(set(wanted)) != len(wanted):
            raise InvalidInput(f"the request names an output twice: {list(wanted)}")
        if loaded.outputs is None:
            return
        offered = [o.name for o in loaded.outputs]
        unknown = [w for w in wanted if w not in offered]
        if unknown:
            raise InvalidInput(
                f"the model has no output {', '.join(map(repr, unknown))}; it offers {offered}"
            )

    def unload(self, model: Any) -> None:
        """Release what `load` acquired beyond Python memory (default: nothing to release)."""
        return None

    def held(self, model: Any) -> Any:
        """The object whose life is the loaded model's memory (default: `model` itself). After
        an eviction the worker watches it to see the memory freed (workers/collector.py); a
        runtime whose `model` is a small wrapper names what the wrapper holds."""
        return model

    def check_inputs(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> None:
        """Reject one request whose inputs cannot be batched into this model."""
        if not inputs:
            raise InvalidInput("the request has no inputs")
        for name, arr in inputs.items():
            if arr.ndim < 1:
                raise InvalidInput(
                    f"input {name!r} is a scalar; inputs need a first (batch) dimension"
                )
        rows = {arr.shape[0] for arr in inputs.values()}
        if len(rows) > 1:
            shown = ", ".join(f"{n!r}: {list(a.shape)}" for n, a in inputs.items())
            raise InvalidInput(f"inputs disagree on the batch dimension ({shown})")
        signature = loaded.signature
        if signature is None:
            return
        expected = [s.name for s in signature]
        if len(inputs) != len(signature):
            raise InvalidInput(
                f"the model expects {len(signature)} input(s) {expected}; got {len(inputs)} "
                f"{list(inputs)}"
            )
        # With one input on each side the name carries no information: clients commonly send
        # their own name (ModelMesh Serving's digits
        # example, kserve/modelmesh-serving docs/predictors/README.md, sends "predict").
        if len(signature) == 1:
            pairs = [(next(iter(inputs.items())), signature[0])]
        else:
            missing = [n for n in expected if n not in inputs]
            if missing:
                raise InvalidInput(
                    f"the model expects inputs {expected}; got {list(inputs)} (missing {missing})"
                )
            pairs = [((s.name, inputs[s.name]), s) for s in signature]
        for (name, arr), spec in pairs:
            _check_one(name, arr, spec)

    @staticmethod
    def _batched_outputs(runtime: str, outputs: Any, rows: int) -> dict[str, np.ndarray]:
        """Outputs as arrays, each with the batch rows first, or an InferenceError."""
        if not isinstance(outputs, dict) or not outputs:
            raise InferenceError(
                f"{runtime} predict must return a non-empty dict of name -> array, "
                f"got {type(outputs).__name__}"
            )
        out = {}
        for name, value in outputs.items():
            arr = np.asarray(value)
            if arr.ndim < 1 or arr.shape[0] != rows:
                raise InferenceError(
                    f"{runtime} output {name!r} has shape {list(arr.shape)}; its first dimension "
                    f"must be the {rows} batch row(s)"
                )
            out[str(name)] = arr
        return out


def _check_one(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
    shape = list(arr.shape)
    fits = len(shape) == len(spec.shape) and all(
        want == -1 or got == want for got, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise InvalidInput(f"input {name!r} has shape {shape}; the model expects {spec.shape}")
    if spec.datatype is not None and not _castable(arr, DATATYPE_TO_DTYPE[spec.datatype]):
        try:
            got = dtype_to_datatype(arr.dtype)
        except InvalidInput:
            got = str(arr.dtype)
        raise InvalidInput(
            f"input {name!r} is {got}; the model expects {spec.datatype} and the values do not "
            "convert without loss of range or kind"
        )


def _castable(arr: np.ndarray, target: np.dtype) -> bool:
    """Whether `arr` converts to `target` without changing what its values mean.

    Stricter than numpy's "same_kind" (no float -> int, no out-of-range ints) and looser than
    "safe" where clients routinely differ from the model: JSON clients send FP64 or INT64 to FP32
    models, which is the precision the model computes in anyway.
    """
    src = arr.dtype
    if target.kind == "O":
        return src.kind in "OUS"
    if src.kind not in "biuf":
        return False
    if target.kind == "f":
        return True
    if target.kind == "b":
        return src.kind == "b"
    if src.kind == "f":
        return False
    if np.can_cast(src, target, casting="safe") or arr.size == 0:
        return True
    info = np.iinfo(target)
    return int(arr.min()) >= info.min and int(arr.max()) <= info.max


def model_signature(loaded: Loaded, runtime: str, generation: float) -> ModelSignature:
    """What the worker records of a loaded model for its metadata (mesh/models.py)."""

    def tensors(specs: list[TensorSpec] | None) -> list[TensorMetadata]:
        return [TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs or []]

    return ModelSignature(
        runtime=runtime,
        inputs=tensors(loaded.signature),
        outputs=tensors(loaded.outputs),
        default_outputs=loaded.default_outputs,
        generation=generation,
    )


def pick_outputs(runtime: str, outputs: dict[str, Any], wanted: Sequence[str] | None) -> dict[str, Any]:
    """The `wanted` entries of a predict's outputs (all of them for None), in the order asked."""
    if wanted is None:
        return outputs
    missing = [w for w in wanted if w not in outputs]
    if missing:
        raise InvalidInput(f"{runtime} model has no output {', '.join(map(repr, missing))}; it gave {list(outputs)}")
    return {w: outputs[w] for w in wanted}


def resolve_model_file(runtime: str, path: Path, suffixes: tuple[str, ...]) -> Path:
    """The model file at `path`, or the single file with one of `suffixes` in directory `path`.

    ModelMesh hands runtimes either the file or the directory it was unpacked into.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(found) == 1:
            return found[0]
        raise ModelLoadFailed(
            f"cannot load {runtime} model from directory {path}: expected exactly one "
            f"{'/'.join(suffixes)} file, found {len(found)}"
        )
    raise ModelLoadFailed(f"cannot load {runtime} model from {path}: no such file")


def load_failed(runtime: str, path: Path | str, exc: BaseException, hint: str = "") -> ModelLoadFailed:
    """Wrap a library's exception so the message says what was being loaded, and from where."""
    text = str(exc).strip()
    detail = text.splitlines()[0][:500] if text else "(no message)"
    return ModelLoadFailed(
        f"cannot load {runtime} model from {path}: {type(exc).__name__}: {detail}"
        + (f" ({hint})" if hint else "")
    )


_SKIP_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
)
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)  # Python >= 3.11 has a default one
_ARRAY_HEADER = 112  # sys.getsizeof of an empty ndarray
# Large containers are sampled rather than walked: a model holding a 10M-element Python list
# must not make the load measurably slower.
_SAMPLE = 1000


def estimate_nbytes(obj: Any, max_depth: int = 32) -> int:
    """Approximate memory held by `obj`: numpy buffers plus the Python objects reaching them.

    Walks containers, instance `__dict__`s and `__slots__`, and the state of extension objects
    that define `__getstate__` (sklearn's Cython trees keep their arrays there). Shared objects
    and array buffers are counted once; code objects, modules and classes are not counted
    (they are shared with the rest of the process).
    """
    # id -> object: holding the objects keeps temporaries (e.g. `__getstate__` results) alive,
    # so their ids cannot be reused by later objects and wrongly look already counted.
    seen: dict[int, Any] = {}
    total = 0
    stack: list[tuple[Any, int, float]] = [(obj, 0, 1.0)]
    while stack:
        o, depth, weight = stack.pop()
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) in seen:
                continue
            seen[id(base)] = base
            total += int(weight * (base.nbytes + _ARRAY_HEADER))
            if base.dtype.kind == "O" and depth < max_depth:
                _push_items(stack, base.ravel().tolist(), depth, weight)
            continue
        if id(o) in seen or isinstance(o, _SKIP_TYPES):
            continue
        seen[id(o)] = o
        try:
            total += int(weight * sys.getsizeof(o))
        except TypeError:
            pass
        if depth >= max_depth or isinstance(o, (str, bytes, bytearray, int, float, complex)):
            continue
        if isinstance(o, dict):
            _push_items(stack, [x for kv in o.items() for x in kv], depth, weight)
        elif isinstance(o, (list, tuple, set, frozenset)):
            _push_items(stack, list(o), depth, weight)
        else:
            _push_attributes(stack, o, depth, weight)
    return total


def _push_items(stack: list, items: list, depth: int, weight: float) -> None:
    if len(items) > _SAMPLE:
        step = len(items) / _SAMPLE
        weight *= step
        items = [items[int(i * step)] for i in range(_SAMPLE)]
    stack.extend((x, depth + 1, weight) for x in items)


def _push_attributes(stack: list, o: Any, depth: int, weight: float) -> None:
    d = getattr(o, "__dict__", None)
    if isinstance(d, dict):
        stack.append((d, depth + 1, weight))
    for cls in type(o).__mro__:
        for slot in cls.__dict__.get("__slots__", ()):
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                try:
                    stack.append((getattr(o, slot), depth + 1, weight))
                except AttributeError:
                    pass
    getstate = getattr(type(o), "__getstate__", None)
    if d is None and getstate is not None and getstate is not _OBJECT_GETSTATE:
        # Extension types (e.g. sklearn.tree._tree.Tree) expose their buffers only here.
        try:
            stack.append((o.__getstate__(), depth + 1, weight))
        except Exception:
            pass
