"""Model metadata (KServe V2's shape): recorded by the worker that loads a model, read through
MeshClient.get_model_metadata and `mesh models metadata`, with real workers."""

from __future__ import annotations

import json

import pytest

from mesh import FailedPrecondition, ModelNotFound
from mesh.models import ModelMetadata

from .test_cli import run  # noqa: F401  (the fixture)
from .test_foundation import sklearn_info


def test_metadata_of_a_loaded_model_and_of_a_vmodel(client, workers, svm_path, mlp_path):
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    with pytest.raises(FailedPrecondition, match="has not been loaded yet"):
        client.get_model_metadata("digits")
    md = client.get_model_metadata("digits", load=True, timeout=120)
    assert isinstance(md, ModelMetadata)
    assert md.name == "digits" and md.platform == "sklearn" and md.versions == []
    assert [(t.name, t.shape) for t in md.inputs] == [("input_0", [-1, 64])]
    outputs = {t.name: t for t in md.outputs}
    # SVC(gamma=0.001) has no probabilities; it has a decision function
    assert set(outputs) == {"predict", "decision_function"}
    assert outputs["predict"].datatype == "INT64" and outputs["predict"].shape == [-1]
    assert outputs["decision_function"].shape == [-1, 10]
    assert md.default_outputs == ["predict"]
    # KServe V2's JSON, as a gateway returns it
    assert set(md.model_dump(mode="json")) >= {"name", "versions", "platform", "inputs", "outputs"}

    # a vmodel: its active model's signature, that model's id in versions
    client.set_vmodel("mnist", "digits")
    md = client.get_model_metadata(vmodel_id="mnist")
    assert md.name == "mnist" and md.versions == ["digits"] and md.inputs[0].shape == [-1, 64]
    with pytest.raises(ModelNotFound):
        client.get_model_metadata("nope")
    with pytest.raises(ModelNotFound):
        client.get_model_metadata(vmodel_id="nope")

    # an id registered again with another model never shows the first one's signature
    client.delete_vmodel("mnist")
    client.unregister_model("digits")
    client.register_model("digits", sklearn_info(mlp_path))
    with pytest.raises(FailedPrecondition):
        client.get_model_metadata("digits")
    md = client.get_model_metadata("digits", load=True, timeout=120)
    assert {t.name for t in md.outputs} >= {"predict", "predict_proba"}


def test_mesh_models_metadata_and_infer_output(run, client, workers, svm_path, tmp_path):  # noqa: F811
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    proc = run("models", "metadata", "digits", "--load", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == "digits" and data["platform"] == "sklearn"
    assert data["inputs"] == [{"name": "input_0", "datatype": None, "shape": [-1, 64]}]
    proc = run("models", "metadata", "digits")
    assert proc.returncode == 0, proc.stderr
    assert "input_0" in proc.stdout and "decision_function" in proc.stdout and "predict" in proc.stdout
    # `mesh infer --output` names the outputs (a V2 body's own `outputs` too)
    from mesh.tools.examples import seed_digits_tensor

    request = tmp_path / "request.json"
    request.write_text(json.dumps([seed_digits_tensor()]))
    proc = run("infer", "digits", str(request), "--output", "decision_function", "--output", "predict")
    assert proc.returncode == 0, proc.stderr
    response = json.loads(proc.stdout)
    assert [o["name"] for o in response["outputs"]] == ["decision_function", "predict"]
    assert response["outputs"][1]["data"] == [8]
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"inputs": [seed_digits_tensor()], "outputs": [{"name": "decision_function"}]}))
    proc = run("infer", "digits", str(body))
    assert proc.returncode == 0, proc.stderr
    assert [o["name"] for o in json.loads(proc.stdout)["outputs"]] == ["decision_function"]
    proc = run("infer", "digits", str(request), "--output", "predict_proba")
    assert proc.returncode == 1 and "no output 'predict_proba'" in proc.stderr
