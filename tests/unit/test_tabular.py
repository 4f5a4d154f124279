"""Tables and outputs without workers: DataFrames as one V2 tensor per column and back, in the
model's column order with the columns' dtypes; KServe V2 `outputs` parsing; the outputs each
runtime offers, checked against the libraries' own predictions."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import InvalidInput
from mesh.models import ModelInfo
from mesh.protocol.tensors import decode_inputs, decode_output_names, encode_inputs, encode_output_names
from workers.runtimes import get_runtime
from workers.runtimes.tabular import tabular_input

pd = pytest.importorskip("pandas")


def frame():
    return pd.DataFrame({
        "age": np.array([31, 45, 27], dtype=np.int64),
        "income": np.array([1.5, 2.25, 0.75], dtype=np.float64),
        "score": np.array([0.1, 0.2, 0.3], dtype=np.float32),
        "member": np.array([True, False, True]),
        "city": ["Oslo", "Lima", "Pune"],
        "tier": pd.Categorical(["a", "b", "a"]),
    })  # fmt: skip


def test_a_dataframe_travels_as_one_tensor_per_column_with_its_dtypes():
    tensors = encode_inputs(frame())
    assert [(t["name"], t["datatype"], t["shape"]) for t in tensors] == [
        ("age", "INT64", [3]), ("income", "FP64", [3]), ("score", "FP32", [3]), ("member", "BOOL", [3]),
        ("city", "BYTES", [3]), ("tier", "BYTES", [3]),
    ]  # fmt: skip
    assert tensors[5]["data"] == ["a", "b", "a"]  # a categorical's values, not its codes
    # the worker rebuilds the frame in the model's order, whatever the request's
    arrays = decode_inputs(tensors)
    names = ["tier", "city", "member", "score", "income", "age"]
    rebuilt = tabular_input("sklearn", arrays, len(names), names)
    assert list(rebuilt.columns) == names
    assert [str(rebuilt[c].dtype) for c in ["age", "income", "score", "member"]] == \
        ["int64", "float64", "float32", "bool"]  # fmt: skip
    assert str(rebuilt["city"].dtype) in ("object", "str")  # pandas 3 infers its string dtype
    assert rebuilt["age"].tolist() == [31, 45, 27]


def test_what_a_dataframe_cannot_carry_is_refused_by_the_client():
    with pytest.raises(InvalidInput, match="column 'n' .* has no V2 form"):
        encode_inputs(pd.DataFrame({"n": pd.array([1, None], dtype="Int64")}))
    with pytest.raises(InvalidInput, match="missing values"):
        encode_inputs(pd.DataFrame({"s": ["a", None]}))
    with pytest.raises(InvalidInput, match="column names must be strings"):
        encode_inputs(pd.DataFrame({0: [1.0]}))
    with pytest.raises(InvalidInput, match="no V2 datatype"):
        encode_inputs(pd.DataFrame({"t": pd.to_datetime(["2024-01-01"])}))


def test_table_checks_name_what_is_wrong():
    arrays = {"a": np.zeros(3), "b": np.zeros(3), "zz": np.zeros(3)}
    with pytest.raises(InvalidInput, match=r"lacks \['c'\]; has unknown \['zz'\]"):
        tabular_input("sklearn", arrays, 3, ["a", "b", "c"], build=False)
    with pytest.raises(InvalidInput, match="column 'b' has 2 rows; the others have 3"):
        tabular_input("sklearn", {"a": np.zeros(3), "b": np.zeros(2), "c": np.zeros(3)}, 3, ["a", "b", "c"])
    with pytest.raises(InvalidInput, match=r"a column is \[rows\] or \[rows, 1\]"):
        tabular_input("sklearn", {"a": np.zeros((3, 2)), "b": np.zeros(3), "c": np.zeros(3)}, 3, ["a", "b", "c"])
    # one matrix in the model's order is also a table: it gets the model's column names
    x = tabular_input("sklearn", {"input_0": np.arange(6.0).reshape(2, 3)}, 3, ["a", "b", "c"])
    assert list(x.columns) == ["a", "b", "c"] and x["c"].tolist() == [2.0, 5.0]


def test_output_names_in_kserve_v2_form():
    assert decode_output_names([{"name": "predict"}, {"name": "p", "parameters": {"binary_data": False}}]) == \
        ("predict", "p")  # fmt: skip
    assert decode_output_names(["predict_proba"]) == ("predict_proba",)
    assert encode_output_names("predict") == [{"name": "predict"}]
    for bad, why in [([], "non-empty list"), ("x", "non-empty list"), ([{"name": ""}], "non-empty string"),
                     ([{"nom": "x"}], "unknown field"), (["a", "a"], "named twice"), ([3], "non-empty string")]:  # fmt: skip
        with pytest.raises(InvalidInput, match=why):
            decode_output_names(bad)


@pytest.fixture(scope="module")
def iris():
    from sklearn.datasets import load_iris

    return load_iris(return_X_y=True)


def _load(runtime, path):
    return get_runtime(runtime).load(path, ModelInfo(runtime=runtime, uri=f"file://{path}"))


def test_sklearn_offers_what_the_estimator_has(iris, tmp_path):
    import joblib
    from sklearn.svm import SVC

    x, y = iris
    joblib.dump(SVC().fit(x, y), tmp_path / "svc.joblib")
    loaded = _load("sklearn", tmp_path / "svc.joblib")
    assert [o.name for o in loaded.outputs] == ["predict", "decision_function"]  # no probability=True
    rt = loaded.runtime
    with pytest.raises(InvalidInput, match=r"no output 'predict_proba'; it offers \['predict', 'decision_function'\]"):
        rt.check_outputs(loaded, ["predict_proba"])
    with pytest.raises(InvalidInput, match="no output 'predict_proba'"):
        rt.predict(loaded.model, {"x": x[:2]}, ["predict_proba"])


def test_xgboost_and_lightgbm_equal_their_wrappers(iris, tmp_path):
    xgb = pytest.importorskip("xgboost")
    lgb = pytest.importorskip("lightgbm")
    x, y = iris
    xm = xgb.XGBRegressor(n_estimators=5).fit(x, y)
    xm.save_model(tmp_path / "reg.json")
    loaded = _load("xgboost", tmp_path / "reg.json")
    assert [o.name for o in loaded.outputs] == ["predict", "raw_margin"]  # a regressor: no probabilities
    out = loaded.runtime.predict(loaded.model, {"x": x}, None)
    np.testing.assert_allclose(out["predict"], xm.predict(x), rtol=1e-6)
    lm = lgb.LGBMClassifier(n_estimators=5, verbose=-1).fit(x, y)
    lm.booster_.save_model(tmp_path / "m.txt")
    loaded = _load("lightgbm", tmp_path / "m.txt")
    assert loaded.signature[0].shape == [-1, 4]  # trained on an array: one matrix
    out = loaded.runtime.predict(loaded.model, {"x": x}, ["predict_proba", "predict", "raw_margin"])
    assert list(out) == ["predict_proba", "predict", "raw_margin"]
    assert out["predict"].tolist() == lm.predict(x).tolist()
    np.testing.assert_allclose(out["predict_proba"], lm.predict_proba(x), rtol=1e-9)
    np.testing.assert_allclose(out["raw_margin"], lm.predict(x, raw_score=True), rtol=1e-9)
    assert loaded.size_bytes > 0


def test_binary_classifiers_equal_their_wrappers_and_fail_alike(iris, tmp_path):
    """The binary case (one probability column made two) and a failing library call, for both
    runtimes: their predict is one (BoosterRuntime), so they answer and fail in one way."""
    from mesh.errors import InferenceError

    xgb = pytest.importorskip("xgboost")
    lgb = pytest.importorskip("lightgbm")
    x, y = iris
    y = (y > 0).astype(int)
    xm = xgb.XGBClassifier(n_estimators=5).fit(x, y)
    xm.save_model(tmp_path / "bin.json")
    lm = lgb.LGBMClassifier(n_estimators=5, verbose=-1).fit(x, y)
    lm.booster_.save_model(tmp_path / "bin.txt")
    for name, path, wrapper in [("xgboost", "bin.json", xm), ("lightgbm", "bin.txt", lm)]:
        loaded = _load(name, tmp_path / path)
        rt = loaded.runtime
        assert [o.name for o in loaded.outputs] == ["predict", "predict_proba", "raw_margin"]
        out = rt.predict(loaded.model, {"x": x}, ["predict", "predict_proba"])
        assert out["predict"].dtype == np.int64 and out["predict"].tolist() == wrapper.predict(x).tolist()
        np.testing.assert_allclose(out["predict_proba"], wrapper.predict_proba(x), rtol=1e-6)
        assert rt.predict(loaded.model, {"x": x[:3]}, ["raw_margin"])["raw_margin"].shape == (3,)
        offers = r"no output 'decision_function'; it offers \['predict', 'predict_proba', 'raw_margin'\]"
        with pytest.raises(InvalidInput, match=offers):
            rt.predict(loaded.model, {"x": x}, ["decision_function"])
        with pytest.raises(InferenceError, match=f"^{name} predict failed: "):
            rt.predict(loaded.model, {"x": x[:, :3]}, None)  # a column short: the library refuses


class _FakeBooster:
    """BoosterRuntime's hooks over no library: scores are the rows' sums, or what `fail` says."""

    def __init__(self, proba: bool = True, fail: Exception | None = None) -> None:
        self.proba, self.fail, self.calls = proba, fail, []
        self.n_features, self.feature_names, self.categorical = 2, None, {}


def _fake_runtime():
    from workers.runtimes.tabular import BoosterRuntime

    class FakeRuntime(BoosterRuntime):
        name = "fake"

        def load(self, path, info, known_size=None):  # abstract in the base; these tests load nothing
            raise AssertionError("the fake runtime is handed its booster, never loaded")

        def has_proba(self, model):
            return model.proba

        def scores(self, model, x):
            model.calls.append("scores")
            if model.fail is not None:
                raise model.fail
            return x.sum(axis=1) / 10

        def margin(self, model, x):
            model.calls.append("margin")
            return x.sum(axis=1)

        def classes(self, model, value):
            return (value > 0.5).astype(np.int64)

    return FakeRuntime()


def test_booster_runtime_predicts_checks_and_fails_for_its_subclasses():
    from mesh.errors import InferenceError, ModelNotFound

    from workers.runtimes.lightgbm import LightGBMRuntime
    from workers.runtimes.tabular import BoosterRuntime
    from workers.runtimes.xgboost import XGBoostRuntime

    for cls in (XGBoostRuntime, LightGBMRuntime):  # the one predict and check, not copies of it
        assert issubclass(cls, BoosterRuntime)
        assert not {"predict", "check_inputs", "offered"} & set(vars(cls))
    rt, x = _fake_runtime(), np.array([[1.0, 2.0], [4.0, 5.0]])
    model = _FakeBooster()
    out = rt.predict(model, {"x": x}, ["predict_proba", "predict", "raw_margin"])
    assert list(out) == ["predict_proba", "predict", "raw_margin"] and model.calls == ["scores", "margin"]
    np.testing.assert_allclose(out["predict_proba"], [[0.7, 0.3], [0.1, 0.9]])
    assert out["predict"].tolist() == [0, 1] and out["raw_margin"].tolist() == [3.0, 9.0]
    model.calls.clear()
    assert list(rt.predict(model, {"x": x}, None)) == ["predict"] and model.calls == ["scores"]
    model.calls.clear()
    rt.predict(model, {"x": x}, ["raw_margin"])
    assert model.calls == ["margin"]  # no scores computed for nothing
    with pytest.raises(InvalidInput, match=r"no output 'predict_proba'; it offers \['predict', 'raw_margin'\]"):
        rt.predict(_FakeBooster(proba=False), {"x": x}, ["predict_proba"])
    with pytest.raises(InferenceError, match="^fake predict failed: ValueError: boom$"):
        rt.predict(_FakeBooster(fail=ValueError("boom")), {"x": x}, None)
    gone = ModelNotFound("gone")
    with pytest.raises(ModelNotFound) as caught:  # a MeshError goes through as it is
        rt.predict(_FakeBooster(fail=gone), {"x": x}, None)
    assert caught.value is gone
    with pytest.raises(InvalidInput, match=r"the model expects \[-1, 2\]"):
        rt.check_inputs(rt.tabular_loaded(model, 1, []), {"x": np.ones((2, 3))})
    loaded = rt.tabular_loaded(model, 7, [])
    assert loaded.size_bytes == 7 and loaded.default_outputs == ["predict"] and loaded.signature[0].shape == [-1, 2]


def test_damaged_files_are_load_failures(tmp_path):
    from mesh.errors import ModelLoadFailed

    for runtime, name in [("xgboost", "m.json"), ("lightgbm", "m.txt")]:
        (tmp_path / name).write_text("{ not a model")
        with pytest.raises(ModelLoadFailed, match=f"cannot load {runtime} model from .*{name}"):
            _load(runtime, tmp_path / name)


@pytest.fixture(scope="module")
def pets():
    """A table with a categorical column, and a label that depends on it."""
    rng = np.random.default_rng(0)
    n = 400
    table = pd.DataFrame({
        "weight": rng.normal(size=n),
        "kind": pd.Categorical(rng.choice(["cat", "dog", "eel"], n)),
        "age": rng.integers(0, 15, n).astype(np.int64),
    })  # fmt: skip
    label = ((table.weight > 0) & (table.kind == "dog") | (table.age > 12)).astype(int)
    return table, label


def _through_v2(loaded, table, outputs):
    """What a worker does with a DataFrame a client sent: encode, decode, check, predict."""
    arrays = decode_inputs(encode_inputs(table))
    loaded.runtime.check_inputs(loaded, arrays)
    return loaded.runtime.predict(loaded.model, arrays, outputs)


def test_categorical_columns_reach_lightgbm_and_xgboost_as_categoricals(pets, tmp_path):
    lgb = pytest.importorskip("lightgbm")
    xgb = pytest.importorskip("xgboost")
    table, label = pets
    sample = table.iloc[[3, 1, 4, 1, 5, 9, 2, 6]]  # not every category, not in the training order
    lm = lgb.LGBMClassifier(n_estimators=10, min_child_samples=5, verbose=-1).fit(table, label)
    lm.booster_.save_model(tmp_path / "pets.txt")
    loaded = _load("lightgbm", tmp_path / "pets.txt")
    assert loaded.model.categorical == {"kind": ["cat", "dog", "eel"]}
    out = _through_v2(loaded, sample, ["predict", "predict_proba"])
    assert out["predict"].tolist() == lm.predict(sample).tolist()
    np.testing.assert_allclose(out["predict_proba"], lm.predict_proba(sample), rtol=1e-9)
    # the codes of the training categories work too
    codes = sample.assign(kind=sample.kind.cat.codes.astype(np.int64))
    np.testing.assert_allclose(_through_v2(loaded, codes, ["predict_proba"])["predict_proba"],
                               lm.predict_proba(sample), rtol=1e-9)  # fmt: skip
    with pytest.raises(InvalidInput, match="category codes must be in -1..2"):
        _through_v2(loaded, sample.assign(kind=np.full(len(sample), 7, dtype=np.int64)), None)

    xm = xgb.XGBClassifier(n_estimators=10, enable_categorical=True, tree_method="hist").fit(table, label)
    xm.save_model(tmp_path / "pets.json")
    loaded = _load("xgboost", tmp_path / "pets.json")
    assert loaded.model.categorical == {"kind": None}
    out = _through_v2(loaded, sample, ["predict", "predict_proba"])
    assert out["predict"].tolist() == xm.predict(sample).tolist()
    np.testing.assert_allclose(out["predict_proba"], xm.predict_proba(sample), rtol=1e-6)


def test_xgboost_json_models_reload_from_a_ubj_snapshot(iris, tmp_path):
    xgb = pytest.importorskip("xgboost")
    x, y = iris
    xm = xgb.XGBClassifier(n_estimators=5).fit(x, y)
    xm.save_model(tmp_path / "m.json")
    xm.save_model(tmp_path / "m.ubj")
    loaded = _load("xgboost", tmp_path / "m.json")
    rt = loaded.runtime
    data = rt.snapshot(loaded.model)
    again = rt.restore(data, ModelInfo(runtime="xgboost", uri="file:///m.json"), loaded.size_bytes)
    assert again.size_bytes == loaded.size_bytes and again.model.booster.feature_names is None
    np.testing.assert_array_equal(rt.predict(again.model, {"x": x}, ["predict_proba"])["predict_proba"],
                                  xm.predict_proba(x))  # fmt: skip
    assert rt.snapshot(_load("xgboost", tmp_path / "m.ubj").model) is None  # already the fast form


def test_an_sklearn_pipeline_on_text_columns_and_a_sparse_transform_made_dense(tmp_path):
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    table = pd.DataFrame({"city": ["Oslo", "Lima", "Pune", "Oslo"] * 10, "n": np.arange(40, dtype=np.int64)})
    label = (table.city == "Oslo").astype(int)
    encode = ColumnTransformer([("city", OneHotEncoder(), ["city"])], remainder="passthrough")
    joblib.dump(make_pipeline(encode, LogisticRegression()).fit(table, label), tmp_path / "p.joblib")
    loaded = _load("sklearn", tmp_path / "p.joblib")
    assert [t.name for t in loaded.signature] == ["city", "n"]
    out = _through_v2(loaded, table.iloc[:4], ["predict", "predict_proba"])
    assert out["predict"].tolist() == [1, 0, 0, 1]
    joblib.dump(SparseTransform(), tmp_path / "t.joblib")
    transformer = _load("sklearn", tmp_path / "t.joblib")
    dense = transformer.runtime.predict(transformer.model, {"x": np.eye(2)}, ["transform"])["transform"]
    assert isinstance(dense, np.ndarray) and dense.tolist() == [[2.0, 0.0], [0.0, 2.0]]


class SparseTransform:
    """An estimator whose transform gives a scipy sparse matrix (as a one-hot encoder's does)."""

    def predict(self, x):
        return np.zeros(len(x))

    def transform(self, x):
        from scipy import sparse

        return sparse.csr_matrix(np.asarray(x) * 2)
