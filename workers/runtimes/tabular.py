"""Tabular inputs shared by the sklearn, xgboost and lightgbm runtimes, and the part of the
xgboost and lightgbm runtimes that is the same for both (`BoosterRuntime`).

A tabular model takes either one 2-D tensor [rows, features], or, when it was trained on a
pandas DataFrame and so knows its feature names, one tensor per column named after the column
(KServe V2's way of sending a table: MLServer's pandas codec does the same,
SeldonIO/MLServer docs/user-guide/content-type.md). Columns keep their own datatypes, so an
INT64 column reaches the model as int64 next to an FP64 one, as it was trained.

pandas is imported only for models that know their feature names (`feature_frame`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesh.errors import InferenceError, InvalidInput, MeshError

from .base import Loaded, Runtime, TensorSpec


def tabular_signature(n_features: int | None, feature_names: Sequence[str] | None) -> list[TensorSpec] | None:
    """One spec per named column, or the one [rows, features] matrix (None: nothing known)."""
    if feature_names:
        return [TensorSpec(name=str(n), datatype=None, shape=[-1]) for n in feature_names]
    if n_features:
        return [TensorSpec(name="input_0", datatype=None, shape=[-1, int(n_features)])]
    return None


def check_tabular(runtime: str, inputs: dict[str, np.ndarray], n_features: int | None,
                  feature_names: Sequence[str] | None) -> None:  # fmt: skip
    """Reject a request that cannot be fed to the model (`tabular_input` says why)."""
    tabular_input(runtime, inputs, n_features, feature_names, build=False)


def tabular_input(
    runtime: str,
    inputs: dict[str, np.ndarray],
    n_features: int | None,
    feature_names: Sequence[str] | None,
    *,
    build: bool = True,
    categorical: Mapping[str, Sequence[Any] | None] | None = None,
) -> Any:
    """The model's input: an ndarray [rows, features], or a DataFrame with the model's columns in
    its order when it knows its feature names. `build=False` only checks.

    `categorical`: the columns the model took as pandas categoricals, with the categories it
    was trained on when its file keeps them (LightGBM), else None (XGBoost re-codes by value
    itself); those columns become `pd.Categorical` again (`as_categorical`)."""
    if not inputs:
        raise InvalidInput("the request has no inputs")
    names = list(feature_names) if feature_names else None
    if len(inputs) == 1 and not (names and len(names) == 1):
        ((name, x),) = inputs.items()
        x = np.asarray(x)
        # a lone feature vector is a convenience for direct callers; a request's tensor must be
        # 2-D (its first dimension is the batch rows the worker splits the outputs by)
        if build and x.ndim == 1 and n_features and x.shape[0] == n_features:
            x = x.reshape(1, -1)
        if x.ndim != 2:
            raise InvalidInput(
                f"input {name!r} has shape {list(x.shape)}; {runtime} models take [rows, features]"
                + (f" or one tensor per column {names}" if names else "")
            )
        # (predict leaves a wrong width to the library, whose message says more)
        if not build and n_features and x.shape[1] != n_features:
            raise InvalidInput(
                f"input {name!r} has shape {list(x.shape)}; the model expects [-1, {n_features}]"
            )
        if not build:
            return None
        if names:  # a matrix for a model trained on a DataFrame: give it its column names
            return feature_frame(names, [x[:, i] for i in range(x.shape[1])], categorical)
        return x
    if not names:
        raise InvalidInput(
            f"{runtime} models take exactly one input tensor [rows, features]; got {len(inputs)} {list(inputs)} "
            "(one tensor per column needs a model trained on a pandas DataFrame)"
        )
    if len(names) == 1 and len(inputs) == 1:
        inputs = {names[0]: next(iter(inputs.values()))}
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise InvalidInput(
            f"the model's columns are {names}; the request "
            + "; ".join(([f"lacks {missing}"] if missing else []) + ([f"has unknown {extra}"] if extra else []))
        )
    columns, rows = [], None
    for n in names:
        col = np.asarray(inputs[n])
        if col.ndim == 2 and col.shape[1] == 1:
            col = col[:, 0]
        if col.ndim != 1:
            raise InvalidInput(f"column {n!r} has shape {list(col.shape)}; a column is [rows] or [rows, 1]")
        if rows is not None and col.shape[0] != rows:
            raise InvalidInput(f"column {n!r} has {col.shape[0]} rows; the others have {rows}")
        rows = col.shape[0]
        columns.append(col)
    return feature_frame(names, columns, categorical) if build else None


def feature_frame(names: Sequence[str], columns: Sequence[np.ndarray],
                  categorical: Mapping[str, Sequence[Any] | None] | None = None) -> Any:  # fmt: skip
    import pandas as pd  # only models trained on a DataFrame pay for it

    frame = pd.DataFrame({n: c for n, c in zip(names, columns, strict=True)}, columns=list(names))
    for name, categories in (categorical or {}).items():
        if name in frame.columns:
            frame[name] = as_categorical(name, frame[name].to_numpy(), categories)
    return frame


def as_categorical(name: str, values: np.ndarray, categories: Sequence[Any] | None) -> Any:
    """A categorical column from what V2 carried: its values as text (BYTES; a category
    matching none of the model's is missing, as pandas makes it), or, for a model that keeps its
    categories, their integer codes (-1: missing)."""
    import pandas as pd

    if categories is None:
        return pd.Categorical(values) if values.dtype.kind in "OUS" else values
    categories = list(categories)
    # numbers for text categories are their codes; for number categories, their values
    if values.dtype.kind in "iuf" and all(isinstance(c, str) for c in categories):
        if values.dtype.kind == "f" and not np.all(np.isnan(values) | (values == np.trunc(values))):
            raise InvalidInput(f"column {name!r}: category codes must be whole numbers")
        codes = np.where(np.isnan(values), -1, values).astype(np.int64) if values.dtype.kind == "f" else values
        if codes.size and (codes.min() < -1 or codes.max() >= len(categories)):
            raise InvalidInput(
                f"column {name!r}: category codes must be in -1..{len(categories) - 1} (the model's categories "
                f"{categories[:10]}{'...' if len(categories) > 10 else ''}), or send the values as text"
            )
        return pd.Categorical.from_codes(codes.astype(np.int64), categories=categories)
    by_text = {str(c): c for c in categories}
    return pd.Categorical([by_text.get(str(v)) for v in values], categories=categories)


def unnamed(loaded: Loaded) -> Loaded:
    """`loaded` without its signature, for the base checks (scalars, rows that disagree) that
    run before `check_tabular`, which knows the forms a table may take."""
    return Loaded(model=loaded.model, size_bytes=loaded.size_bytes, signature=None, runtime=loaded.runtime)


def two_columns(value: np.ndarray) -> np.ndarray:
    """Class probabilities [rows, classes]: a binary model's one column p becomes [1 - p, p]
    (as the sklearn wrappers' `predict_proba`); a multiclass model's are already that."""
    return np.column_stack([1.0 - value, value]) if value.ndim == 1 else value


class BoosterRuntime(Runtime):
    """A gradient-boosting runtime (xgboost, lightgbm) over a model object with `n_features`,
    `feature_names` and `categorical`, offering the outputs `predict`, `predict_proba` (when
    `has_proba`) and `raw_margin`. A subclass loads its files and says how its library
    predicts: `scores` (the prediction `predict` and `predict_proba` derive from), `classes`
    (`predict` from the scores) and `margin` (`raw_margin`)."""

    @abc.abstractmethod
    def has_proba(self, model: Any) -> bool:
        """Whether the model offers `predict_proba`."""

    @abc.abstractmethod
    def scores(self, model: Any, x: Any) -> np.ndarray:
        """The library's prediction for the batch `x` (`tabular_input`'s)."""

    @abc.abstractmethod
    def classes(self, model: Any, value: np.ndarray) -> np.ndarray:
        """`predict` from `scores`' value: class indices for a classifier, else the value."""

    @abc.abstractmethod
    def margin(self, model: Any, x: Any) -> np.ndarray:
        """`raw_margin`: the untransformed score of the batch `x`."""

    def offered(self, model: Any) -> list[str]:
        return ["predict", *(["predict_proba"] if self.has_proba(model) else []), "raw_margin"]

    def held(self, model: Any) -> Any:
        # the model objects use __slots__ without weak references; the booster is the memory
        return model.booster

    def tabular_loaded(self, model: Any, size: int, outputs: list[TensorSpec]) -> Loaded:
        """What `load` returns: the table's signature, `outputs`, `predict` by default."""
        return Loaded(
            model=model,
            size_bytes=size,
            signature=tabular_signature(model.n_features, model.feature_names),
            runtime=self,
            outputs=outputs,
            default_outputs=["predict"],
        )

    def check_inputs(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> None:
        model = loaded.model
        super().check_inputs(unnamed(loaded), inputs)
        check_tabular(self.name, inputs, model.n_features, model.feature_names)

    def predict(
        self, model: Any, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = tabular_input(self.name, inputs, model.n_features, model.feature_names, categorical=model.categorical)
        wanted = list(outputs or ("predict",))
        offered = self.offered(model)
        unknown = [w for w in wanted if w not in offered]
        if unknown:
            raise InvalidInput(f"the model has no output {', '.join(map(repr, unknown))}; it offers {offered}")
        out: dict[str, np.ndarray] = {}
        try:
            value = None
            if any(w in ("predict", "predict_proba") for w in wanted):
                value = self.scores(model, x)
            for w in wanted:
                if w == "raw_margin":
                    out[w] = self.margin(model, x)
                elif w == "predict_proba":
                    out[w] = two_columns(value)
                else:
                    out[w] = self.classes(model, value)
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(f"{self.name} predict failed: {type(e).__name__}: {e}") from e
        return self._batched_outputs(self.name, out, x.shape[0])
