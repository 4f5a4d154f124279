"""TensorFlow SavedModels through real workers, and seed 003's update story: a vmodel moved from
an sklearn model to a TensorFlow SavedModel under traffic, with no failed request.

TensorFlow is imported by this test process (to compare with its own predictions) and by the
workers that load the model, no other.
"""

from __future__ import annotations

import numpy as np
import pytest

from mesh import InvalidInput, ModelInfo
from mesh.models import ModelState, VModelState
from mesh.tools.launcher import wait_for

from .test_foundation import answer, seed_tensor, sklearn_info
from .test_vmodels import Traffic, assert_cut_over_once, copy_model

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tf_path(tmp_path_factory):
    from mesh.tools import examples

    return examples.train_digits_tf(tmp_path_factory.mktemp("tf") / "mnist.savedmodel")


def tf_info(path) -> ModelInfo:
    return ModelInfo(runtime="tensorflow", uri=f"file://{path}")


def _output(response: dict, name: str) -> np.ndarray:
    (t,) = [o for o in response["outputs"] if o["name"] == name]
    return np.asarray(t["data"]).reshape(t["shape"])


def test_answers_equal_tensorflows_own(client, workers, tf_path):
    from sklearn.datasets import load_digits

    workers("w1")
    client.register_model("mnist-tf", tf_info(tf_path))
    x = load_digits().data[::61].astype(np.float32)
    reference = tf.saved_model.load(str(tf_path)).signatures["serving_default"](input_0=tf.constant(x))
    response = client.infer(model_id="mnist-tf", inputs=x).get(timeout=180)
    assert sorted(o["name"] for o in response["outputs"]) == ["predict", "probabilities"]
    assert _output(response, "predict").tolist() == reference["predict"].numpy().tolist()
    np.testing.assert_allclose(_output(response, "probabilities"), reference["probabilities"].numpy(), rtol=1e-6)
    # one output named: that one alone; a name the signature lacks fails that request alone
    response = client.infer(model_id="mnist-tf", inputs=x, outputs=["probabilities"]).get(timeout=60)
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    with pytest.raises(InvalidInput, match="no output 'predict_proba'"):
        client.infer(model_id="mnist-tf", inputs=x, outputs=["predict_proba"]).get(timeout=60)
    # the signature's shape is checked per request, before batching
    with pytest.raises(InvalidInput, match=r"the model expects \[-1, 64\]"):
        client.infer(model_id="mnist-tf", inputs=np.zeros((2, 10), np.float32)).get(timeout=60)
    assert client.store.get_record("mnist-tf").size_bytes > 0


def test_seed_003_sklearn_to_tensorflow_under_traffic(
    client, workers, redis_url, prefix, svm_path, model_dir, seed_input, tf_path
):
    workers("w1")
    client.register_model("mnist-svm", sklearn_info(copy_model(svm_path, model_dir, "mnist-svm")))
    client.set_vmodel("mnist", "mnist-svm", load_now=True, sync=True, timeout=120)
    with Traffic(redis_url, prefix, "mnist", seed_input) as traffic:
        wait_for(lambda: traffic.count("mnist-svm") >= 8 or traffic.failures, 120, what="traffic on the sklearn model")
        # seed 003: the InferenceService's storage moves to tensorflow/mnist.savedmodel
        client.set_vmodel("mnist", "mnist-tf", model_info=tf_info(tf_path), auto_delete_target_model=True)
        done = wait_for(
            lambda: (s := client.get_vmodel_status("mnist")).status is VModelState.DEFINED and s,
            300, what="the transition to the TensorFlow model",
        )  # fmt: skip
        assert done.active_model_id == "mnist-tf" and done.active_model_state is ModelState.LOADED
        wait_for(lambda: traffic.count("mnist-tf") >= 8 or traffic.failures, 120, what="traffic on the TensorFlow model")
    assert traffic.failures == [] and traffic.wrong == []
    assert_cut_over_once(traffic.answered, "mnist-svm", "mnist-tf")
    r = client.infer(vmodel_id="mnist", inputs=[seed_tensor(seed_input)]).get(timeout=60)
    assert r["model_name"] == "mnist-tf" and answer(r) == 8
    assert "probabilities" in [o["name"] for o in r["outputs"]]
