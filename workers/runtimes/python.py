"""User-defined Python models (after Cortex's Python predictor).

`ModelInfo.python_class` names the class as "package.module:ClassName"; the module must be
importable on the worker and allowed by its operator (`MESH_PYTHON_MODULES`, see
`check_python_class`): a model record is data anyone with write access to the registry can
write, and a class name from it must not pick arbitrary code (`subprocess:Popen` would run
the binary its uri names). The contract, checked at load time:

- Construction: if the class defines `load`, the worker calls `cls()` and then
  `instance.load(path)`; otherwise it calls `cls(path)`. `path` is the local `pathlib.Path` of
  the model's files (a file or a directory; the class decides what to read from it).
- `predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]` (required). Inputs are
  batched: the first dimension of every input is the batch rows, and the first dimension of
  every output must equal those rows. Raise `mesh.errors.InvalidInput` for bad input; any
  other exception fails the batch as an `InferenceError`.
- `signature() -> list[TensorSpec | dict]` (optional): the inputs the model expects, so that
  bad requests are rejected one by one before batching (see `Runtime.check_inputs`). With a
  one-input signature, `predict` receives that input under the declared name whatever the
  client called it.
- `size_bytes() -> int` (optional): the model's memory; otherwise it is estimated by walking
  the instance's attributes (`estimate_nbytes`).
- `unload()` (optional): release resources beyond Python memory (files, sessions, threads).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from mesh.errors import InferenceError, InvalidInput, MeshError, ModelLoadFailed, PermissionDenied
from mesh.models import ModelInfo

from .base import Loaded, Runtime, TensorSpec, estimate_nbytes, pick_outputs

log = logging.getLogger(__name__)


class PythonRuntime(Runtime):
    name = "python"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        spec = info.python_class
        if not spec:
            raise ModelLoadFailed(
                "runtime 'python' needs python_class ('package.module:ClassName') in the model info"
            )
        cls = _import_class(spec)
        try:
            if callable(getattr(cls, "load", None)):
                model = cls()
                model.load(Path(path))
            else:
                model = cls(Path(path))
        except MeshError:
            raise
        except Exception as e:
            raise ModelLoadFailed(
                f"cannot load python model {spec} from {path}: {type(e).__name__}: {e}"
            ) from e
        if not callable(getattr(model, "predict", None)):
            raise ModelLoadFailed(f"python model class {spec} has no predict(inputs) method")
        signature = _signature(spec, model)
        return Loaded(
            model=PythonModel(instance=model, signature=signature),
            size_bytes=_size(spec, model, known_size),
            signature=signature,
            runtime=self,
        )

    def predict(
        self, model: PythonModel, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if not inputs:
            raise InvalidInput("the request has no inputs")
        first = next(iter(inputs.values()))
        if first.ndim == 0:
            raise InvalidInput("inputs need a first (batch) dimension; got a scalar")
        sig = model.signature
        # check_inputs accepts any name for a single-input model, so the user's predict gets
        # the name it declared rather than whatever the client called it.
        if sig is not None and len(sig) == 1 and len(inputs) == 1:
            inputs = {sig[0].name: first}
        user = model.instance
        try:
            result = user.predict(inputs)
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(
                f"{type(user).__name__}.predict failed: {type(e).__name__}: {e}"
            ) from e
        # the user's predict computes all its outputs; a request naming some gets those
        label = f"{type(user).__name__}.predict"
        result = self._batched_outputs(label, result, first.shape[0])
        return pick_outputs(label, result, outputs)

    def held(self, model: PythonModel) -> Any:
        return model.instance

    def unload(self, model: PythonModel) -> None:
        unload = getattr(model.instance, "unload", None)
        if callable(unload):
            try:
                unload()
            except Exception:
                # The model is being dropped either way; a failing cleanup must not stop the
                # worker from freeing the slot.
                log.exception("%s.unload() failed", type(model.instance).__name__)


@dataclass
class PythonModel:
    """What `Loaded.model` holds for this runtime: the user's instance and its signature."""

    instance: Any
    signature: list[TensorSpec] | None


def allowed_modules(setting: str | None) -> tuple[str, ...]:
    """MESH_PYTHON_MODULES as a tuple of module names (unset or empty: none)."""
    return tuple(m.strip() for m in (setting or "").split(",") if m.strip())


def _within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def check_python_class(spec: str | None, allowed: tuple[str, ...]) -> None:
    """Raise PermissionDenied unless `spec` names a class defined in an allowed module.

    The module is checked before it is imported (importing runs its code), and the class
    after: an allowed module that imports `Popen` must not lend it out as `mymodels:Popen`.
    """
    module_name, _, _ = (spec or "").partition(":")
    if not allowed:
        raise PermissionDenied(
            f"PERMISSION_DENIED: python_class {spec!r}: this worker allows no python model "
            "modules; an operator allows them with MESH_PYTHON_MODULES (docs/security.md)"
        )
    if not module_name or not _within(module_name, allowed):
        raise PermissionDenied(
            f"PERMISSION_DENIED: python_class {spec!r} is not in a module this worker allows "
            f"(MESH_PYTHON_MODULES: {', '.join(allowed)})"
        )
    cls = _import_class(spec or "")
    defined_in = getattr(cls, "__module__", "") or ""
    if not _within(defined_in, allowed):
        raise PermissionDenied(
            f"PERMISSION_DENIED: python_class {spec!r} is {defined_in}.{cls.__qualname__}, "
            f"defined outside the modules this worker allows (MESH_PYTHON_MODULES: {', '.join(allowed)})"
        )


def _import_class(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ModelLoadFailed(f"python_class {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelLoadFailed(
            f"cannot import module {module_name!r} of python_class {spec!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelLoadFailed(f"module {module_name!r} has no attribute {class_name!r}")
    if not isinstance(cls, type):
        raise ModelLoadFailed(f"python_class {spec!r} is a {type(cls).__name__}, not a class")
    return cls


def _size(spec: str, model: Any, known_size: int | None) -> int:
    size_fn = getattr(model, "size_bytes", None)
    if not callable(size_fn):  # the model's own report wins; the estimate is done once
        return known_size or estimate_nbytes(model)
    try:
        size = size_fn()
    except Exception as e:
        raise ModelLoadFailed(f"{spec}.size_bytes() failed: {type(e).__name__}: {e}") from e
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ModelLoadFailed(f"{spec}.size_bytes() must return a non-negative int, got {size!r}")
    return int(size)


def _signature(spec: str, model: Any) -> list[TensorSpec] | None:
    sig_fn = getattr(model, "signature", None)
    if not callable(sig_fn):
        return None
    try:
        raw = sig_fn()
    except Exception as e:
        raise ModelLoadFailed(f"{spec}.signature() failed: {type(e).__name__}: {e}") from e
    if raw is None:
        return None
    try:
        return [s if isinstance(s, TensorSpec) else TensorSpec.model_validate(s) for s in raw]
    except (ValidationError, TypeError) as e:
        raise ModelLoadFailed(f"{spec}.signature() returned an invalid signature: {e}") from e
