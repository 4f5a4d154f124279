"""XGBoost, LightGBM and scikit-learn models through real workers: classes and probabilities
equal the library's own in-process predictions, outputs chosen per request (different ones in
one batch), a DataFrame reaching a model trained on a DataFrame with its column names and dtypes.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest

from mesh import BatchingConfig, InvalidInput, ModelInfo
from mesh.client import raise_for_item

pd = pytest.importorskip("pandas")
xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")


def _iris_frame():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    frame = pd.DataFrame(X, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    # an integer column beside float ones: its dtype must survive the trip
    frame["sepal_length"] = (frame["sepal_length"] * 10).round().astype("int64")
    return frame, y


def _cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    return X[:, :8], y


@pytest.fixture(scope="module")
def tabular_models(tmp_path_factory) -> dict[str, tuple[Path, object, object]]:
    """name -> (model file, the library's in-process model, inputs to compare on)."""
    from sklearn.linear_model import LogisticRegression

    d = tmp_path_factory.mktemp("tabular")
    frame, y = _iris_frame()
    X, yb = _cancer()
    out = {}
    m = xgb.XGBClassifier(n_estimators=8, max_depth=3).fit(frame.to_numpy(dtype=float), y)
    m.save_model(d / "xgb-iris.json")
    out["xgb_multi"] = ("xgboost", d / "xgb-iris.json", m, frame.to_numpy(dtype=float)[::7])
    m = xgb.XGBClassifier(n_estimators=8, max_depth=3).fit(X, yb)
    m.save_model(d / "xgb-cancer.ubj")
    out["xgb_binary"] = ("xgboost", d / "xgb-cancer.ubj", m, X[::37])
    m = lgb.LGBMClassifier(n_estimators=8, num_leaves=7, verbose=-1).fit(frame, y)
    m.booster_.save_model(d / "lgb-iris.txt")
    out["lgb_frame"] = ("lightgbm", d / "lgb-iris.txt", m, frame.iloc[::7])
    m = lgb.LGBMClassifier(n_estimators=8, num_leaves=7, verbose=-1).fit(X, yb)
    m.booster_.save_model(d / "lgb-cancer.txt")
    out["lgb_binary"] = ("lightgbm", d / "lgb-cancer.txt", m, X[::37])
    m = LogisticRegression(max_iter=1000).fit(frame, y)
    joblib.dump(m, d / "sk-iris.joblib")
    out["sk_frame"] = ("sklearn", d / "sk-iris.joblib", m, frame.iloc[::7])
    return out


def _output(response: dict, name: str) -> np.ndarray:
    (t,) = [o for o in response["outputs"] if o["name"] == name]
    return np.asarray(t["data"]).reshape(t["shape"])


def _register(client, tabular_models, *names: str, **batching) -> None:
    for name in names:
        runtime, path, _, _ = tabular_models[name]
        info = ModelInfo(runtime=runtime, uri=f"file://{path}",
                         batching=BatchingConfig(**batching) if batching else None)  # fmt: skip
        client.register_model(name, info)


@pytest.mark.parametrize("name", ["xgb_multi", "xgb_binary", "lgb_frame", "lgb_binary", "sk_frame"])
def test_answers_equal_the_librarys_own(client, workers, tabular_models, name):
    workers("w1")
    _register(client, tabular_models, name)
    _, _, reference, inputs = tabular_models[name]
    response = client.infer(model_id=name, inputs=inputs, outputs=["predict", "predict_proba"]).get(timeout=120)
    assert [o["name"] for o in response["outputs"]] == ["predict", "predict_proba"]
    assert _output(response, "predict").tolist() == reference.predict(inputs).tolist()
    np.testing.assert_allclose(_output(response, "predict_proba"), reference.predict_proba(inputs), rtol=1e-6)
    # no outputs named: the default, predict alone
    response = client.infer(model_id=name, inputs=inputs).get(timeout=60)
    assert [o["name"] for o in response["outputs"]] == ["predict"]
    assert _output(response, "predict").tolist() == reference.predict(inputs).tolist()
    # the measured size is in the registry for placement
    assert client.store.get_record(name).size_bytes > 0


def test_raw_margins_and_a_bad_output_fails_alone(client, workers, tabular_models):
    workers("w1")
    _register(client, tabular_models, "xgb_binary", "lgb_binary")
    for name in ("xgb_binary", "lgb_binary"):
        _, _, reference, inputs = tabular_models[name]
        response = client.infer(model_id=name, inputs=inputs, outputs=["raw_margin"]).get(timeout=120)
        if name.startswith("xgb"):
            expected = reference.predict(inputs, output_margin=True)
        else:
            expected = reference.predict(inputs, raw_score=True)
        np.testing.assert_allclose(_output(response, "raw_margin"), expected, rtol=1e-5, atol=1e-6)
    _, _, reference, inputs = tabular_models["xgb_binary"]
    bad = client.infer(model_id="xgb_binary", inputs=inputs, outputs=["predict", "nope"])
    good = client.infer(model_id="xgb_binary", inputs=inputs)
    with pytest.raises(InvalidInput, match="no output 'nope'"):
        bad.get(timeout=60)
    assert _output(good.get(timeout=60), "predict").tolist() == reference.predict(inputs).tolist()


def test_requests_in_one_batch_ask_for_different_outputs(client, workers, tabular_models):
    workers("w1")
    _register(client, tabular_models, "sk_frame", max_batch_size=64, max_batch_delay_ms=50)
    client.ensure_loaded("sk_frame", sync=True, timeout=120)
    _, _, reference, frame = tabular_models["sk_frame"]
    choices = [["predict"], ["predict_proba"], ["decision_function", "predict"], None]
    sent = []
    for i in range(40):
        rows = frame.iloc[i % 10 : i % 10 + 3]
        sent.append((rows, choices[i % 4], client.infer(model_id="sk_frame", inputs=rows, outputs=choices[i % 4])))
    for rows, wanted, handle in sent:
        response = handle.get(timeout=60)
        assert [o["name"] for o in response["outputs"]] == (wanted or ["predict"])
        for name in wanted or ["predict"]:
            np.testing.assert_allclose(_output(response, name), getattr(reference, name)(rows), rtol=1e-9)
    # a micro-batch asks once for all its items
    response = client.infer_many(model_id="sk_frame", inputs=[frame.iloc[:2], frame.iloc[5:6]],
                                 outputs=["predict_proba"]).get(timeout=60)  # fmt: skip
    (first, second) = [raise_for_item(r) for r in response["results"]]
    np.testing.assert_allclose(_output(first, "predict_proba"), reference.predict_proba(frame.iloc[:2]), rtol=1e-9)
    np.testing.assert_allclose(_output(second, "predict_proba"), reference.predict_proba(frame.iloc[5:6]), rtol=1e-9)


def test_named_columns_reach_the_model_in_its_order_with_their_dtypes(client, workers, tabular_models):
    workers("w1")
    _register(client, tabular_models, "lgb_frame", "sk_frame")
    for name in ("lgb_frame", "sk_frame"):
        _, _, reference, frame = tabular_models[name]
        # the columns in another order: the worker puts them in the model's
        shuffled = frame[list(reversed(frame.columns))]
        response = client.infer(model_id=name, inputs=shuffled, outputs=["predict_proba"]).get(timeout=120)
        np.testing.assert_allclose(_output(response, "predict_proba"), reference.predict_proba(frame), rtol=1e-6)
        # V2 tensors, one per column, as a non-Python client sends them
        tensors = [
            {"name": c, "shape": [len(frame)], "datatype": "INT64" if c == "sepal_length" else "FP64",
             "data": frame[c].tolist()}
            for c in frame.columns
        ]  # fmt: skip
        response = client.infer(model_id=name, inputs=tensors).get(timeout=60)
        assert _output(response, "predict").tolist() == reference.predict(frame).tolist()
        # a missing column fails that request alone, naming it
        with pytest.raises(InvalidInput, match="lacks \\['petal_width'\\]"):
            client.infer(model_id=name, inputs=frame.drop(columns=["petal_width"])).get(timeout=60)
