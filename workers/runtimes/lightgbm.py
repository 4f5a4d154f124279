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
from collections.abc import Sequence
from pathlib import Path

import lightgbm as lgb
import numpy as np

from mesh.errors import InferenceError, InvalidInput, MeshError
from mesh.models import ModelInfo

from .base import Loaded, Runtime, TensorSpec, load_failed, resolve_model_file
from .tabular import check_tabular, tabular_input, tabular_signature, unnamed

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


class LightGBMRuntime(Runtime):
    name = "lightgbm"

    def load(self, path: Path, info: ModelInfo, known_size: int | None = None) -> Loaded:
        file = resolve_model_file(self.name, path, _SUFFIXES)
        try:
            model = LightGBMModel(lgb.Booster(model_file=str(file)))
        except Exception as e:  # LightGBMError, or parameters it did not expect
            raise load_failed(self.name, file, e, "not a model written by LightGBM's save_model, or a damaged one") from e
        # the text file is the trees' parameters one to one: its size is about the booster's
        size = known_size or max(file.stat().st_size, 1)
        return Loaded(
            model=model,
            size_bytes=size,
            signature=tabular_signature(model.n_features, model.feature_names),
            runtime=self,
            outputs=_output_specs(model),
            default_outputs=["predict"],
        )

    def check_inputs(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> None:
        model: LightGBMModel = loaded.model
        super().check_inputs(unnamed(loaded), inputs)
        check_tabular(self.name, inputs, model.n_features, model.feature_names)

    def predict(
        self, model: LightGBMModel, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = tabular_input(self.name, inputs, model.n_features, model.feature_names, categorical=model.categorical)
        wanted = list(outputs or ("predict",))
        offered = _offered(model)
        unknown = [w for w in wanted if w not in offered]
        if unknown:
            raise InvalidInput(f"the model has no output {', '.join(map(repr, unknown))}; it offers {offered}")
        out: dict[str, np.ndarray] = {}
        try:
            value = None
            if any(w in ("predict", "predict_proba") for w in wanted):
                value = model.booster.predict(x, num_threads=1)
            for w in wanted:
                if w == "raw_margin":
                    out[w] = model.booster.predict(x, raw_score=True, num_threads=1)
                elif w == "predict_proba":
                    out[w] = np.column_stack([1.0 - value, value]) if value.ndim == 1 else value
                elif model.is_classifier:
                    proba = np.column_stack([1.0 - value, value]) if value.ndim == 1 else value
                    out[w] = np.argmax(proba, axis=1).astype(np.int64)  # LGBMClassifier.predict's rule
                else:
                    out[w] = value
        except MeshError:
            raise
        except Exception as e:
            raise InferenceError(f"lightgbm predict failed: {type(e).__name__}: {e}") from e
        return self._batched_outputs(self.name, out, x.shape[0])


def _offered(model: LightGBMModel) -> list[str]:
    return ["predict", *(["predict_proba"] if model.is_classifier else []), "raw_margin"]


def _output_specs(model: LightGBMModel) -> list[TensorSpec]:
    multi = model.objective in ("multiclass", "multiclassova")
    specs = [TensorSpec(name="predict", datatype="INT64" if model.is_classifier else "FP64", shape=[-1])]
    if model.is_classifier:
        specs.append(TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, model.n_classes]))
    specs.append(TensorSpec(name="raw_margin", datatype="FP64", shape=[-1, model.n_classes] if multi else [-1]))
    return specs


__all__ = ["LightGBMModel", "LightGBMRuntime"]
