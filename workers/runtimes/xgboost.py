"""XGBoost models in the library's own formats: `booster.save_model("model.json")` or
`"model.ubj"` (UBJSON), written by a `Booster` or by the sklearn wrappers (`XGBClassifier`, ...).

These files are data, not pickles: loading one runs no code. The model is a `Booster`; its
objective says what the outputs mean:

- `predict`: the class index for classifiers (`binary:logistic`: probability > 0.5; `multi:*`:
  the most probable class), what `XGBClassifier.predict` returns; the value for regressors.
- `predict_proba` (classifiers with probabilities: `binary:logistic`, `multi:softprob`):
  [rows, classes], as `XGBClassifier.predict_proba` (binary: [1 - p, p]).
- `raw_margin`: the untransformed margin (`output_margin=True`).

Classes are the indices 0..k-1 XGBoost trains on (it takes no other labels since 1.6); a
model whose labels were encoded before training maps them back itself.

Predictions run on one thread per worker process (`nthread=1`): a host runs several workers on
few cores, and Mesh gets throughput from batching and processes (as the ONNX runtime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from mesh.models import ModelInfo

from .base import Loaded, TensorSpec, load_failed, resolve_model_file
from .tabular import BoosterRuntime

_SUFFIXES = (".json", ".ubj")
# objectives whose prediction is a probability of each class (or of class 1)
_PROBA = ("binary:logistic", "multi:softprob")
_CLASSES = (*_PROBA, "multi:softmax", "binary:hinge", "binary:logitraw")


class XGBoostModel:
    __slots__ = ("booster", "objective", "n_classes", "n_features", "feature_names", "iteration_range",
                 "categorical", "from_json")  # fmt: skip

    def __init__(self, booster: xgb.Booster, from_json: bool = False) -> None:
        self.booster = booster
        self.from_json = from_json
        config = json.loads(booster.save_config())
        learner = config["learner"]
        self.objective: str = learner["objective"]["name"]
        self.n_classes = max(2, int(learner["learner_model_param"].get("num_class", "0") or 0))
        self.n_features: int = booster.num_features()
        self.feature_names: list[str] | None = list(booster.feature_names) if booster.feature_names else None
        # categorical features ("c"): text columns become pandas categoricals, which XGBoost
        # (>= 3.1 keeps the training categories) re-codes by value
        types = booster.feature_types or []
        self.categorical: dict[str, None] = (
            {n: None for n, t in zip(self.feature_names, types, strict=False) if t == "c"} if self.feature_names else {}
        )
        # as XGBModel.predict: a model trained with early stopping predicts with its best trees
        best = booster.attr("best_iteration")
        self.iteration_range = (0, int(best) + 1) if best is not None else (0, 0)

    @property
    def is_classifier(self) -> bool:
        return self.objective in _CLASSES


class XGBoostRuntime(BoosterRuntime):
    name = "xgboost"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        file = resolve_model_file(self.name, path, _SUFFIXES)
        try:
            booster = xgb.Booster(model_file=str(file))
            model = XGBoostModel(booster, from_json=file.suffix == ".json")
        except Exception as e:  # XGBoostError, or a config without the fields read above
            raise load_failed(self.name, file, e, "not a model written by XGBoost's save_model, or a damaged one") from e
        # the trees in XGBoost's own binary form: about what the booster holds in memory
        size = known_size or max(len(booster.save_raw(raw_format="ubj")), 1)
        return self._loaded(model, size)

    # A JSON model reloads from its UBJ form about 1.6x faster (a 300-tree classifier: 84 ms ->
    # 52 ms on 2 busy cores); a UBJ file is that form already, so it has no snapshot.
    def snapshot(self, model: XGBoostModel) -> bytes | None:
        return bytes(model.booster.save_raw(raw_format="ubj")) if model.from_json else None

    def snapshot_tag(self) -> str:
        return f"xgboost {xgb.__version__}"

    def restore(self, data: bytes, info: ModelInfo, known_size: int) -> Loaded:
        booster = xgb.Booster()
        booster.load_model(bytearray(data))
        return self._loaded(XGBoostModel(booster, from_json=True), known_size)

    def _loaded(self, model: XGBoostModel, size: int) -> Loaded:
        model.booster.set_param({"nthread": 1})
        return self.tabular_loaded(model, size, _output_specs(model))

    # what BoosterRuntime.predict asks of the library
    def has_proba(self, model: XGBoostModel) -> bool:
        return model.objective in _PROBA

    def scores(self, model: XGBoostModel, x: Any) -> np.ndarray:
        return model.booster.inplace_predict(x, iteration_range=model.iteration_range)

    def margin(self, model: XGBoostModel, x: Any) -> np.ndarray:
        return model.booster.inplace_predict(x, iteration_range=model.iteration_range, predict_type="margin")

    def classes(self, model: XGBoostModel, value: np.ndarray) -> np.ndarray:
        """`predict` from the booster's prediction, as the sklearn wrapper computes it."""
        objective = model.objective
        if objective == "binary:logistic":
            return (value > 0.5).astype(np.int64)
        if objective == "binary:logitraw":
            return (value > 0.0).astype(np.int64)
        if objective == "multi:softprob":
            return np.argmax(value, axis=1).astype(np.int64)
        if objective in ("multi:softmax", "binary:hinge"):
            return value.astype(np.int64)
        return value


def _output_specs(model: XGBoostModel) -> list[TensorSpec]:
    multi = model.objective.startswith("multi:")
    specs = [TensorSpec(name="predict", datatype="INT64" if model.is_classifier else "FP32", shape=[-1])]
    if model.objective in _PROBA:
        specs.append(TensorSpec(name="predict_proba", datatype="FP32", shape=[-1, model.n_classes]))
    specs.append(TensorSpec(name="raw_margin", datatype="FP32", shape=[-1, model.n_classes] if multi else [-1]))
    return specs


__all__ = ["XGBoostModel", "XGBoostRuntime"]
