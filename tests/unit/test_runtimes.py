"""workers.runtimes: real models trained in a tmp dir, loaded and run through each runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from mesh.errors import InferenceError, InvalidInput, ModelLoadFailed
from mesh.models import ModelInfo
from mesh.protocol.tensors import decode_inputs
from mesh.tools.examples import (
    SEED_DIGITS_INPUT,
    export_onnx,
    seed_digits_tensor,
    train_digits_mlp,
    train_digits_svm,
)
from workers.runtimes import (
    RUNTIME_NAMES,
    Loaded,
    Runtime,
    TensorSpec,
    estimate_nbytes,
    get_runtime,
)

REPO = Path(__file__).resolve().parents[2]
DIGITS = load_digits().data  # (1797, 64) float64


def info(runtime: str, path: Path | str = "/nonexistent", **kw) -> ModelInfo:
    return ModelInfo(runtime=runtime, uri=f"file://{path}", **kw)


def load(runtime: str, path: Path, **kw) -> Loaded:
    return get_runtime(runtime).load(path, info(runtime, path, **kw))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    svm = train_digits_svm(d / "svm" / "model.joblib")
    mlp = train_digits_mlp(d / "mlp" / "model.joblib", hidden=(64,))
    return {
        "svm": svm,
        "svm_onnx": export_onnx(svm, d / "svm_onnx" / "model.onnx"),
        "mlp": mlp,
        "mlp_onnx": export_onnx(mlp, d / "mlp_onnx" / "model.onnx"),
    }


# --------------------------------------------------------------------------- user classes
# Example models for the python runtime; python_class names them by this module's import name.


class Scaler:
    """Constructed as `cls(path)`: reads its factor from the model file."""

    def __init__(self, path: Path) -> None:
        self.factor = float(Path(path).read_text())
        self.weights = np.zeros(10_000)  # 80 kB, to be seen by estimate_nbytes

    def signature(self):
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, inputs):
        x = inputs["x"]  # the declared name, whatever the client called it
        if (x < 0).any():
            raise InvalidInput("Scaler takes non-negative values")
        if (x > 1e6).any():
            raise ZeroDivisionError("values too large for this example")
        return {"y": x * self.factor, "rows": np.arange(len(x))}


UNLOADED: list[str] = []


class TwoInputs:
    """Constructed as `cls()` then `load(path)`; declares its size; records its unload."""

    def load(self, path: Path) -> None:
        self.path = path

    def signature(self):
        return [
            TensorSpec(name="a", datatype="INT8", shape=[-1]),
            TensorSpec(name="b", datatype=None, shape=[-1, 3]),
        ]

    def size_bytes(self) -> int:
        return 12345

    def predict(self, inputs):
        return {"sum": inputs["a"].astype(np.int64) + inputs["b"].sum(axis=1)}

    def unload(self) -> None:
        UNLOADED.append(str(self.path))


class WrongRows:
    def __init__(self, path):
        pass

    def predict(self, inputs):
        return {"y": np.zeros(1)}


class NotAModel:
    def __init__(self, path):
        pass


class BrokenInit:
    def __init__(self, path):
        raise OSError("weights.bin is missing")


class FailingUnload(WrongRows):
    def unload(self):
        raise RuntimeError("boom")


not_a_class = 42


def python_class(cls_name: str) -> str:
    return f"{__name__}:{cls_name}"


# --------------------------------------------------------------------------- registry


def test_registry():
    # producers check registrations against the protocol's names without importing the worker
    from workers.runtimes import _RUNTIMES

    assert RUNTIME_NAMES == ("sklearn", "onnx", "python", "xgboost", "lightgbm", "tensorflow") == tuple(_RUNTIMES)
    for name in RUNTIME_NAMES:
        if name == "tensorflow":  # seconds to import: tests/integration/test_tensorflow.py loads it
            continue
        runtime = get_runtime(name)
        assert isinstance(runtime, Runtime)
        assert runtime.name == name
        assert runtime is get_runtime(name)
        assert runtime.loading_concurrency >= 1
    with pytest.raises(
        ModelLoadFailed, match=r"unknown runtime 'pytorch'; known: sklearn, onnx, python"
    ):
        get_runtime("pytorch")


def test_importing_the_registry_does_not_import_model_libraries():
    code = (
        "import sys, workers.runtimes\n"
        "heavy = {'onnxruntime', 'sklearn', 'joblib', 'xgboost', 'lightgbm', 'tensorflow', 'pandas'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=60)


# ---------------------------------- ModelMesh Serving's example input (SEED_DIGITS_INPUT)


@pytest.mark.parametrize(
    ("model", "runtime", "output"), [("svm", "sklearn", "predict"), ("svm_onnx", "onnx", "label")]
)
def test_seed_input_predicts_8(models, model, runtime, output):
    loaded = load(runtime, models[model])
    inputs = decode_inputs([seed_digits_tensor()])  # named "predict", not the model's name
    loaded.runtime.check_inputs(loaded, inputs)
    out = loaded.runtime.predict(loaded.model, inputs)
    assert out[output].tolist() == [8]


def test_sklearn_load(models):
    loaded = load("sklearn", models["svm"])
    assert loaded.runtime is get_runtime("sklearn")
    assert loaded.signature == [TensorSpec(name="input_0", datatype=None, shape=[-1, 64])]
    assert loaded.size_bytes >= models["svm"].stat().st_size
    assert loaded.size_bytes >= loaded.model.support_vectors_.nbytes


def test_a_known_size_is_reported_without_walking_the_model_again(models, monkeypatch, tmp_path):
    """Reloads pass the size measured at the first load: sklearn's walk of the model (a quarter
    of a small model's load) is not repeated, and a python model without size_bytes() neither;
    a python model's own size_bytes() still wins."""
    import workers.runtimes.python as python_runtime
    import workers.runtimes.sklearn as sklearn_runtime

    first = load("sklearn", models["svm"])

    def walk(_obj):
        raise AssertionError("estimate_nbytes ran on a reload")

    monkeypatch.setattr(sklearn_runtime, "estimate_nbytes", walk)
    monkeypatch.setattr(python_runtime, "estimate_nbytes", walk)
    again = get_runtime("sklearn").load(models["svm"], info("sklearn", models["svm"]), known_size=first.size_bytes)
    assert again.size_bytes == first.size_bytes
    path = tmp_path / "factor.txt"
    path.write_text("2.5")
    scaler = info("python", path, python_class=python_class("Scaler"))
    assert get_runtime("python").load(path, scaler, known_size=4321).size_bytes == 4321
    own = info("python", tmp_path, python_class=python_class("TwoInputs"))
    assert get_runtime("python").load(tmp_path, own, known_size=4321).size_bytes == 12345


def test_onnx_load(models):
    loaded = load("onnx", models["svm_onnx"])
    assert loaded.signature == [TensorSpec(name="input_0", datatype="FP32", shape=[-1, 64])]
    assert loaded.size_bytes == models["svm_onnx"].stat().st_size
    assert loaded.model.output_names == ["label", "probabilities"]
    options = loaded.model.session.get_session_options()
    assert options.intra_op_num_threads == 1


def test_a_directory_holding_one_model_file_loads(models):
    assert load("sklearn", models["svm"].parent).signature is not None
    assert load("onnx", models["svm_onnx"].parent).signature is not None


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    ("model", "runtime"),
    [("svm", "sklearn"), ("svm_onnx", "onnx"), ("mlp", "sklearn"), ("mlp_onnx", "onnx")],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_batch_outputs_have_the_batch_rows(models, model, runtime, dtype):
    loaded = load(runtime, models[model])
    x = DIGITS[100:107].astype(dtype)
    inputs = {"whatever": x}
    loaded.runtime.check_inputs(loaded, inputs)
    out = loaded.runtime.predict(loaded.model, inputs)
    assert out and all(v.shape[0] == 7 for v in out.values())
    labels = out["predict" if runtime == "sklearn" else "label"]
    reference = joblib.load(models[model.removesuffix("_onnx")]).predict(DIGITS[100:107])
    assert (labels == reference).mean() >= 6 / 7  # ONNX computes in FP32


def test_sklearn_accepts_a_lone_feature_vector(models):
    loaded = load("sklearn", models["svm"])
    out = loaded.runtime.predict(loaded.model, {"x": np.asarray(SEED_DIGITS_INPUT)})
    assert out["predict"].tolist() == [8]


def test_sklearn_predict_rejects_bad_input(models):
    loaded = load("sklearn", models["svm"])
    rt = loaded.runtime
    with pytest.raises(InvalidInput, match="exactly one input tensor"):
        rt.predict(loaded.model, {"a": np.zeros((1, 64)), "b": np.zeros((1, 64))})
    with pytest.raises(
        InvalidInput,
        match=r"input 'x' has shape \[1, 8, 8\]; sklearn models take \[rows, features\]",
    ):
        rt.predict(loaded.model, {"x": np.zeros((1, 8, 8))})
    with pytest.raises(
        InferenceError, match="sklearn predict failed: ValueError: X has 10 features"
    ):
        rt.predict(loaded.model, {"x": np.zeros((2, 10))})


def test_onnx_predict_errors_are_typed(models):
    loaded = load("onnx", models["svm_onnx"])
    with pytest.raises(InferenceError, match="onnx predict failed"):
        loaded.runtime.predict(loaded.model, {"x": np.zeros((2, 10), dtype=np.float32)})


# --------------------------------------------------------------------------- check_inputs


@pytest.mark.parametrize(("model", "runtime"), [("svm", "sklearn"), ("svm_onnx", "onnx")])
@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"predict": np.zeros((1, 10), np.float32)},
            "input 'predict' has shape [1, 10]; the model expects [-1, 64]",
        ),
        (
            {"predict": np.zeros(64, np.float32)},
            "input 'predict' has shape [64]; the model expects [-1, 64]",
        ),
        (
            {"predict": np.zeros((1, 8, 8), np.float32)},
            "input 'predict' has shape [1, 8, 8]; the model expects [-1, 64]",
        ),
        (
            {"predict": np.float32(1)},
            "input 'predict' is a scalar; inputs need a first (batch) dimension",
        ),
        (
            {"a": np.zeros((1, 64)), "b": np.zeros((1, 64))},
            "the model expects 1 input(s) ['input_0']; got 2 ['a', 'b']",
        ),
        ({}, "the request has no inputs"),
    ],
)
def test_check_inputs_rejects(models, model, runtime, inputs, message):
    loaded = load(runtime, models[model])
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    with pytest.raises(InvalidInput) as err:
        loaded.runtime.check_inputs(loaded, inputs)
    assert str(err.value) == message


def test_check_inputs_datatypes(models):
    onnx = load("onnx", models["svm_onnx"])
    check = onnx.runtime.check_inputs
    for dtype in (np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_):
        check(onnx, {"x": np.zeros((2, 64), dtype)})
    with pytest.raises(InvalidInput, match="input 'x' is BYTES; the model expects FP32"):
        check(onnx, {"x": np.full((1, 64), "a", dtype=object)})

    two = load("python", Path("/unused"), python_class=python_class("TwoInputs"))
    check = two.runtime.check_inputs
    b = np.zeros((2, 3))
    check(two, {"a": np.array([1, -128], np.int64), "b": b})  # INT64 values that fit INT8
    with pytest.raises(InvalidInput, match="input 'a' is INT64; the model expects INT8"):
        check(two, {"a": np.array([1, 128], np.int64), "b": b})
    with pytest.raises(InvalidInput, match="input 'a' is FP32; the model expects INT8"):
        check(two, {"a": np.array([1.0, 2.0], np.float32), "b": b})
    check(two, {"a": np.zeros(2, np.int8), "b": np.full((2, 3), "s", dtype=object)})  # b: any type


def test_check_inputs_names_matter_with_several_inputs():
    two = load("python", Path("/unused"), python_class=python_class("TwoInputs"))
    check = two.runtime.check_inputs
    with pytest.raises(
        InvalidInput, match=r"expects inputs \['a', 'b'\]; got \['a', 'c'\] \(missing \['b'\]\)"
    ):
        check(two, {"a": np.zeros(2, np.int8), "c": np.zeros((2, 3))})
    with pytest.raises(
        InvalidInput, match=r"inputs disagree on the batch dimension \('a': \[2\], 'b': \[3, 3\]\)"
    ):
        check(two, {"a": np.zeros(2, np.int8), "b": np.zeros((3, 3))})


def test_check_inputs_without_a_signature_only_needs_a_batch_dimension():
    loaded = load("python", Path("/unused"), python_class=python_class("WrongRows"))
    assert loaded.signature is None
    loaded.runtime.check_inputs(loaded, {"anything": np.zeros((3, 5, 7))})
    with pytest.raises(InvalidInput, match="is a scalar"):
        loaded.runtime.check_inputs(loaded, {"anything": np.zeros(())})


# --------------------------------------------------------------------------- load failures


@pytest.mark.parametrize("runtime", ["sklearn", "onnx"])
def test_missing_file(tmp_path, runtime):
    path = tmp_path / "nope" / "model.bin"
    with pytest.raises(ModelLoadFailed) as err:
        load(runtime, path)
    assert str(err.value) == f"cannot load {runtime} model from {path}: no such file"


@pytest.mark.parametrize(("runtime", "suffix"), [("sklearn", ".joblib"), ("onnx", ".onnx")])
@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 50, b"PK\x03\x04 not really a zip"])
def test_corrupt_file(tmp_path, runtime, suffix, content):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(ModelLoadFailed) as err:
        load(runtime, path)
    message = str(err.value)
    assert message.startswith(f"cannot load {runtime} model from {path}: ")
    assert len(message) > len(f"cannot load {runtime} model from {path}: ") + 5  # names the cause
    assert "\n" not in message


def test_sklearn_load_errors_say_what_they_mean(tmp_path):
    path = tmp_path / "model.joblib"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadFailed, match=r"EOFError: \(no message\) \(the file is empty\)$"):
        load("sklearn", path)
    path.write_bytes(b"\x00garbage\xff" * 50)
    with pytest.raises(
        ModelLoadFailed, match=r"\(not a file written by joblib.dump, or a damaged one\)$"
    ):
        load("sklearn", path)
    # A pickle of a class from a module this worker does not have.
    path.write_bytes(
        b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x0bnosuchmodxx\x94\x8c\x03Foo\x94\x93\x94."
    )
    with pytest.raises(
        ModelLoadFailed,
        match=r"ModuleNotFoundError: No module named 'nosuchmodxx' \(the model needs a module",
    ):
        load("sklearn", path)


def test_sklearn_file_without_a_model(tmp_path):
    path = tmp_path / "model.joblib"
    joblib.dump({"weights": [1, 2]}, path)
    with pytest.raises(
        ModelLoadFailed, match=r"from .*model\.joblib: TypeError: dict object has no predict method"
    ):
        load("sklearn", path)


def test_onnx_runtime_given_a_joblib_file(models, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(models["svm"].read_bytes())
    with pytest.raises(ModelLoadFailed, match=f"cannot load onnx model from {path}: "):
        load("onnx", path)


def test_directory_with_no_or_several_model_files(tmp_path, models):
    with pytest.raises(
        ModelLoadFailed, match="expected exactly one .joblib/.pkl/.pickle file, found 0"
    ):
        load("sklearn", tmp_path)
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(models["svm_onnx"].read_bytes())
    with pytest.raises(ModelLoadFailed, match="expected exactly one .onnx file, found 2"):
        load("onnx", tmp_path)


# --------------------------------------------------------------------------- python runtime


def test_python_runtime_cls_path_style(tmp_path):
    path = tmp_path / "factor.txt"
    path.write_text("2.5")
    loaded = load("python", path, python_class=python_class("Scaler"))
    assert loaded.signature == [TensorSpec(name="x", datatype="FP32", shape=[-1, 2])]
    assert loaded.size_bytes >= 80_000  # estimated from the instance's attributes
    rt = loaded.runtime
    inputs = {"client_name": np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], np.float32)}
    rt.check_inputs(loaded, inputs)
    out = rt.predict(loaded.model, inputs)
    assert out["y"].tolist() == [[2.5, 5.0], [7.5, 10.0], [0.0, 0.0]]
    assert out["rows"].tolist() == [0, 1, 2]
    with pytest.raises(InvalidInput, match="Scaler takes non-negative values"):
        rt.predict(loaded.model, {"x": np.array([[-1.0, 0.0]])})
    with pytest.raises(
        InferenceError, match="Scaler.predict failed: ZeroDivisionError: values too large"
    ):
        rt.predict(loaded.model, {"x": np.array([[1e7, 0.0]])})
    rt.unload(loaded.model)  # no unload(): nothing to do


def test_python_runtime_load_style_size_and_unload(tmp_path):
    loaded = load("python", tmp_path, python_class=python_class("TwoInputs"))
    assert loaded.size_bytes == 12345
    out = loaded.runtime.predict(
        loaded.model, {"a": np.array([1, 2], np.int8), "b": np.ones((2, 3))}
    )
    assert out["sum"].tolist() == [4, 5]
    loaded.runtime.unload(loaded.model)
    assert UNLOADED[-1] == str(tmp_path)


def test_python_runtime_output_contract():
    loaded = load("python", Path("/unused"), python_class=python_class("WrongRows"))
    with pytest.raises(
        InferenceError,
        match=r"output 'y' has shape \[1\]; its first dimension must be the 3 batch row\(s\)",
    ):
        loaded.runtime.predict(loaded.model, {"x": np.zeros((3, 2))})


def test_python_runtime_unload_errors_are_logged_not_raised(caplog):
    loaded = load("python", Path("/unused"), python_class=python_class("FailingUnload"))
    loaded.runtime.unload(loaded.model)
    assert "FailingUnload.unload() failed" in caplog.text


@pytest.mark.parametrize(
    ("python_cls", "message"),
    [
        (None, "runtime 'python' needs python_class ('package.module:ClassName')"),
        (
            "no_such_module_xyz:Model",
            "cannot import module 'no_such_module_xyz' of python_class "
            "'no_such_module_xyz:Model': ModuleNotFoundError",
        ),
        (python_class("Missing"), f"module {__name__!r} has no attribute 'Missing'"),
        (python_class("not_a_class"), "is a int, not a class"),
        (python_class("NotAModel"), "has no predict(inputs) method"),
        (python_class("BrokenInit"), "from /unused: OSError: weights.bin is missing"),
    ],
)
def test_python_runtime_load_failures(python_cls, message):
    with pytest.raises(ModelLoadFailed) as err:
        load("python", Path("/unused"), python_class=python_cls)
    assert message in str(err.value)


# --------------------------------------------------------------------------- estimate_nbytes


def test_estimate_nbytes_counts_buffers_once():
    a = np.zeros(100_000)  # 800 kB
    assert 800_000 <= estimate_nbytes(a) < 801_000
    shared = {"x": a, "y": a, "view": a[10:], "t": (a.T,)}
    assert 800_000 <= estimate_nbytes(shared) < 802_000
    cycle: list = []
    cycle.append(cycle)
    assert estimate_nbytes(cycle) > 0


def test_estimate_nbytes_walks_objects_and_extension_state():
    x, y = load_digits(return_X_y=True)
    tree = DecisionTreeClassifier(random_state=0).fit(x, y)
    # The Cython Tree has no __dict__: its arrays are only reachable through __getstate__.
    assert estimate_nbytes(tree) >= tree.tree_.value.nbytes + tree.tree_.node_count * 64

    class Holder:
        __slots__ = ("arr",)

        def __init__(self):
            self.arr = np.zeros(1000)

    assert estimate_nbytes(Holder()) >= 8000
    big = list(range(200_000))  # sampled, but still about right
    assert 0.9 * 7.2e6 <= estimate_nbytes(big) <= 1.1 * 7.2e6


# ---------------------------------- outputs a request names (KServe V2 `outputs`)


def test_onnx_computes_only_the_outputs_named(models):
    loaded = load("onnx", models["mlp_onnx"])
    assert [(o.name, o.datatype) for o in loaded.outputs] == [("label", "INT64"), ("probabilities", "FP32")]
    x = DIGITS[:3].astype(np.float32)
    out = loaded.runtime.predict(loaded.model, {"x": x}, ["probabilities"])
    assert list(out) == ["probabilities"] and out["probabilities"].shape == (3, 10)
    with pytest.raises(InvalidInput, match=r"no output 'predict'; it offers \['label', 'probabilities'\]"):
        loaded.runtime.check_outputs(loaded, ["predict"])


def test_python_models_give_the_outputs_named_from_what_predict_returns(tmp_path):
    path = tmp_path / "factor.txt"
    path.write_text("2")
    loaded = load("python", path, python_class=python_class("Scaler"))
    assert loaded.outputs is None  # unknown until predict returns: any name passes the check
    loaded.runtime.check_outputs(loaded, ["rows"])
    x = np.ones((2, 2), dtype=np.float32)
    assert list(loaded.runtime.predict(loaded.model, {"x": x}, ["rows", "y"])) == ["rows", "y"]
    with pytest.raises(InvalidInput, match="has no output 'z'"):
        loaded.runtime.predict(loaded.model, {"x": x}, ["z"])


# --------------------------------------------------------------------------- non-finite inputs
def test_a_nan_or_infinity_is_the_clients_error_before_batching_where_the_model_refuses_it(models):
    loaded = load("sklearn", models["svm"])
    rt = loaded.runtime
    for bad in (np.nan, np.inf, -np.inf):
        x = np.asarray([SEED_DIGITS_INPUT], dtype=np.float32)
        x[0, 3] = bad
        with pytest.raises(InvalidInput, match=r"input 'x' holds NaN or infinity, which SVC does not take"):
            rt.check_inputs(loaded, {"x": x})
    rt.check_inputs(loaded, {"x": np.asarray([SEED_DIGITS_INPUT], dtype=np.float32)})  # finite: fine
    rt.check_inputs(loaded, {"x": np.asarray([SEED_DIGITS_INPUT], dtype=np.int64)})  # no NaN in ints


def test_models_that_take_nan_still_get_it(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    y = load_digits().target
    x = np.asarray([SEED_DIGITS_INPUT])
    x[0, 3] = np.nan
    for name, model in [
        ("hgb", HistGradientBoostingClassifier(max_iter=5).fit(DIGITS, y)),  # takes NaN natively
        ("imputed", make_pipeline(SimpleImputer(), SVC()).fit(DIGITS, y)),  # its first step imputes
    ]:
        path = tmp_path / f"{name}.joblib"
        joblib.dump(model, path)
        loaded = load("sklearn", path)
        loaded.runtime.check_inputs(loaded, {"x": x})
        assert loaded.runtime.predict(loaded.model, {"x": x})["predict"].shape == (1,)


class OwnNanHandling(LogisticRegression):
    """A subclass elsewhere of an estimator that refuses NaN: its own predict may treat NaN
    (here: as zero)."""

    def predict(self, X):
        return super().predict(np.nan_to_num(np.asarray(X, dtype=np.float64)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # quality is irrelevant here
def test_an_estimator_defined_outside_scikit_learn_decides_for_itself(tmp_path):
    path = tmp_path / "own.joblib"
    joblib.dump(OwnNanHandling(max_iter=20).fit(DIGITS, load_digits().target), path)
    loaded = load("sklearn", path)
    x = np.asarray([SEED_DIGITS_INPUT])
    x[0, 3] = np.nan
    loaded.runtime.check_inputs(loaded, {"x": x})
    assert loaded.runtime.predict(loaded.model, {"x": x})["predict"].shape == (1,)
