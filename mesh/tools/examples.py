"""Example models for the demo, the tests and the benchmarks.

Everything is trained from `sklearn.datasets.load_digits()` (it ships with scikit-learn, no
download), with fixed seeds, in about a second or less on two cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np

# The 8x8 digit of ModelMesh Serving's example request (the sklearn "mnist-svm" model);
# it is `load_digits()` sample 898, a handwritten 8.
SEED_DIGITS_INPUT: list[float] = [
    0.0, 0.0, 1.0, 11.0, 14.0, 15.0, 3.0, 0.0,
    0.0, 1.0, 13.0, 16.0, 12.0, 16.0, 8.0, 0.0,
    0.0, 8.0, 16.0, 4.0, 6.0, 16.0, 5.0, 0.0,
    0.0, 5.0, 15.0, 11.0, 13.0, 14.0, 0.0, 0.0,
    0.0, 0.0, 2.0, 12.0, 16.0, 13.0, 0.0, 0.0,
    0.0, 0.0, 0.0, 13.0, 16.0, 16.0, 6.0, 0.0,
    0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 7.0, 0.0,
    0.0, 0.0, 0.0, 11.0, 13.0, 12.0, 1.0, 0.0,
]  # fmt: skip
SEED_DIGITS_ANSWER = 8


def seed_digits_tensor() -> dict[str, Any]:
    """The V2 input tensor of the example request in kserve/modelmesh-serving
    docs/predictors/README.md (its name, "predict", is not the model's input name)."""
    return {
        "name": "predict",
        "shape": [1, 64],
        "datatype": "FP32",
        "data": list(SEED_DIGITS_INPUT),
    }


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.reshape(len(digits.images), -1), digits.target


def train_digits_svm(path: str | Path) -> Path:
    """Train sklearn's classic digits classifier, `SVC(gamma=0.001)`, and save it with joblib.

    As in sklearn's "Recognizing hand-written digits" example, it is fitted on the first half of
    the 1797 digits (train_test_split(shuffle=False, test_size=0.5)). The example input (sample
    898) is the first sample of the held-out half and is predicted 8 (so is it when fitted on
    all the digits). Takes ~20 ms.
    """
    from sklearn import svm

    x, y = _digits()
    half = len(x) // 2
    model = svm.SVC(gamma=0.001)
    model.fit(x[:half], y[:half])
    got = model.predict(np.asarray([SEED_DIGITS_INPUT]))[0]
    if got != SEED_DIGITS_ANSWER:  # would mean scikit-learn changed under us
        raise RuntimeError(f"the digits SVM predicts {got} for the example input, not 8")
    return _dump(model, path)


def train_digits_mlp(path: str | Path, hidden: tuple[int, ...] = (256, 256)) -> Path:
    """Train an MLPClassifier on all the digits and save it with joblib (~1 s on 2 cores).

    This is the model where batching pays: per-call overhead dominates a small batch, and
    numpy's matrix products get cheaper per row as rows grow. Measured on 2 cores with the
    default (256, 256) and one BLAS thread: sklearn predict takes ~125 us for 1 row and
    ~280 us for 32 rows (2.3x the cost for 32x the work; ~215 us with 2 BLAS threads on an
    idle machine); through its ONNX export (one intra-op thread), ~9 us and ~33 us.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    model = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=100, random_state=0)
    with warnings.catch_warnings():
        # A demo model needs no tuning; smaller `hidden` may stop before converging.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return _dump(model, path)


def export_onnx(sklearn_model_path: str | Path, onnx_path: str | Path) -> Path:
    """Convert a joblib-saved sklearn model to ONNX with one FP32 input "input_0" [None, n].

    Classifiers are exported without skl2onnx's ZipMap, so their outputs are plain tensors:
    "label" (INT64 [rows]) and "probabilities" (FP32 [rows, classes]; an SVC without
    probability=True exports its decision scores there). skl2onnx is a test dependency only.
    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    model = joblib.load(sklearn_model_path)
    n_features = int(model.n_features_in_)
    options = {id(model): {"zipmap": False}} if is_classifier(model) else None
    with warnings.catch_warnings():
        # skl2onnx reads attributes that newer scikit-learn flags as deprecated (SVC.probA_).
        warnings.simplefilter("ignore", FutureWarning)
        onx = to_onnx(
            model,
            initial_types=[("input_0", FloatTensorType([None, n_features]))],
            options=options,
        )
    out = Path(onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onx.SerializeToString())
    return out


def train_digits_tf(path: str | Path, steps: int = 300) -> Path:
    """Train a softmax regression on the digits in TensorFlow and save it as a SavedModel
    directory (seed 003's `tensorflow/mnist.savedmodel`, small enough for a test: ~1 s after
    TensorFlow's import).

    Its `serving_default` signature takes "input_0" (FP32 [None, 64], raw 0..16 pixels as the
    sklearn models take them) and answers "predict" (INT64 [None], the digit: the name the
    sklearn models answer with, so a client reading it is unchanged when a vmodel moves from
    one to the other) and "probabilities" (FP32 [None, 10]). tensorflow is imported here only.
    """
    import tensorflow as tf

    x, y = _digits()
    model = _DigitsSoftmax(tf)
    tf.random.set_seed(0)
    optimizer = tf.keras.optimizers.Adam(0.05)
    xs, ys = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ys, model.logits(xs)))
        grads = tape.gradient(loss, [model.w, model.b])
        optimizer.apply_gradients(zip(grads, [model.w, model.b]))
    got = int(model.serve(tf.constant([SEED_DIGITS_INPUT], tf.float32))["predict"].numpy()[0])
    if got != SEED_DIGITS_ANSWER:
        raise RuntimeError(f"the digits TensorFlow model predicts {got} for the example input, not 8")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(model, str(out), signatures={"serving_default": model.serve})
    return out


class _DigitsSoftmax:
    """Built by `train_digits_tf` (a factory, so that importing this module imports no TensorFlow)."""

    def __new__(cls, tf: Any) -> Any:
        class DigitsSoftmax(tf.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = tf.Variable(tf.zeros([64, 10]), name="w")
                self.b = tf.Variable(tf.zeros([10]), name="b")

            def logits(self, x: Any) -> Any:
                return (x / 16.0) @ self.w + self.b

            @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="input_0")])
            def serve(self, input_0: Any) -> dict:
                logits = self.logits(input_0)
                return {"predict": tf.argmax(logits, axis=1), "probabilities": tf.nn.softmax(logits)}

        return DigitsSoftmax()


def _dump(model: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out)
    return out
