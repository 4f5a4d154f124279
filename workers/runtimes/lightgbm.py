"""LightGBM models in the library's text format: `booster.save_model("model.txt")` (an
`LGBMClassifier`'s is `model.booster_.save_model(...)`).

The file is data, not a pickle: loading it runs no code. The model is a `Booster`; its
objective says what the outputs mean:

- `predict`: the class index for classifiers (`binary`: probability > 0.5; `multiclass`,
  `multiclassova`: the most probable class), what `LGBMClassifier.predict` returns when it was
  trained on the labels 0..k-1; the value for regressors and rankers.
- `predict_proba` (classifiers): [rows, classes], as `LGBMClassifier.predict_proba`.
- `raw_margin`: the untransformed score (`raw_score=True`).

The text file does not keep an `LGBMClassifier`'s own labels (its `classes_`), only the
indices 0..k-1 it trained on. Columns a DataFrame-trained model took as pandas categoricals
become categoricals again with the categories the file keeps (their values sent as text, or
their codes: docs/runtimes.md, "Tables").

Predictions run on one thread per worker process (`num_threads=1`), as the ONNX runtime.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from mesh.models import ModelInfo

from .base import Loaded, TensorSpec, load_failed, resolve_model_file
from .tabular import BoosterRuntime, two_columns

_SUFFIXES = (".txt", ".lgb", ".model")
# the names LightGBM gives the features of a model trained on a bare array
_DEFAULT_NAME = re.compile(r"Column_\d+")


class LightGBMModel:
    __slots__ = ("booster", "objective", "n_classes", "n_features", "feature_names", "categorical")

    def __init__(self, booster: lgb.Booster) -> None:
        self.booster = booster
        self.objective: str = str(booster.params.get("objective", "regression")).split()[0]
        self.n_classes = max(2, int(booster.params.get("num_class", 1) or 1))
        self.n_features: int = booster.num_feature()
        names = booster.feature_name()
        named = names and not all(_DEFAULT_NAME.fullmatch(n) for n in names)
        self.feature_names: list[str] | None = list(names) if named else None
        # a model trained on pandas categoricals keeps their categories, in the order of its
        # categorical features: requests send their values (or codes), made categorical again
        self.categorical: dict[str, list] = {}
        indices = booster.params.get("categorical_feature") or []
        kept = booster.pandas_categorical or []
        if self.feature_names and isinstance(indices, list) and len(indices) == len(kept):
            self.categorical = {self.feature_names[int(i)]: list(c) for i, c in zip(indices, kept, strict=True)}

    @property
    def is_classifier(self) -> bool:
        return self.objective in ("binary", "multiclass", "multiclassova")


class LightGBMRuntime(BoosterRuntime):
    name = "lightgbm"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        file = resolve_model_file(self.name, path, _SUFFIXES)
        try:
            model = LightGBMModel(lgb.Booster(model_file=str(file)))
        except Exception as e:  # LightGBMError, or parameters it did not expect
            raise load_failed(self.name, file, e, "not a model written by LightGBM's save_model, or a damaged one") from e
        # the text file is the trees' parameters one to one: its size is about the booster's
        size = known_size or max(file.stat().st_size, 1)
        return self.tabular_loaded(model, size, _output_specs(model))

    # what BoosterRuntime.predict asks of the library
    def has_proba(self, model: LightGBMModel) -> bool:
        return model.is_classifier

    def scores(self, model: LightGBMModel, x: Any) -> np.ndarray:
        return model.booster.predict(x, num_threads=1)

    def margin(self, model: LightGBMModel, x: Any) -> np.ndarray:
        return model.booster.predict(x, raw_score=True, num_threads=1)

    def classes(self, model: LightGBMModel, value: np.ndarray) -> np.ndarray:
        if model.is_classifier:
            return np.argmax(two_columns(value), axis=1).astype(np.int64)  # LGBMClassifier.predict's rule
        return value


def _output_specs(model: LightGBMModel) -> list[TensorSpec]:
    multi = model.objective in ("multiclass", "multiclassova")
    specs = [TensorSpec(name="predict", datatype="INT64" if model.is_classifier else "FP64", shape=[-1])]
    if model.is_classifier:
        specs.append(TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, model.n_classes]))
    specs.append(TensorSpec(name="raw_margin", datatype="FP64", shape=[-1, model.n_classes] if multi else [-1]))
    return specs


__all__ = ["LightGBMModel", "LightGBMRuntime"]
