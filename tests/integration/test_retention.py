"""Retention end to end: which model a full worker evicts, under each MESH_EVICTION_POLICY."""

from __future__ import annotations

import shutil

import pytest

from mesh import ModelInfo
from mesh.launcher import wait_for


def seed_tensor(seed_input: list[float]) -> dict:
    return {"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}


@pytest.mark.parametrize(("policy", "kept", "evicted"), [("usage", "m_hot", "m_once"), ("lru", "m_once", "m_hot")])
def test_a_full_worker_evicts_by_its_policy(client, workers, svm_path, model_dir, seed_input, policy, kept, evicted):
    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{svm_path}")
    size = get_runtime("sklearn").load(svm_path, info).size_bytes
    workers("w1", MESH_WORKER_CAPACITY_BYTES=int(size * 2.5), MESH_EVICTION_POLICY=policy)
    for model_id in ("m_hot", "m_once", "m_new"):
        path = model_dir / f"{policy}_{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))

    def infer(model_id: str) -> None:
        assert client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)["model_name"] == model_id

    for _ in range(6):  # m_hot: used often, but before m_once
        infer("m_hot")
    infer("m_once")  # the most recent use, once
    infer("m_new")  # the worker is full: one of the two must go

    def loaded() -> set[str]:
        (state,) = client.list_workers()
        return {m.model_id for m in state.models}

    wait_for(lambda: loaded() == {kept, "m_new"}, timeout=30, what=f"{evicted} evicted under {policy}")


def test_a_reload_reads_the_snapshot_written_after_the_first_load(client, workers, svm_path, model_dir, seed_input):
    """Two models taking turns on a worker with room for one: every load after each model's
    first comes from its reload snapshot (workers/snapshots.py), and answers the same."""
    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{svm_path}")
    size = get_runtime("sklearn").load(svm_path, info).size_bytes
    w = workers("w1", MESH_WORKER_CAPACITY_BYTES=int(size * 1.5))
    for model_id in ("m_a", "m_b"):
        path = model_dir / f"snap_{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))
    for model_id in ("m_a", "m_b", "m_a", "m_b", "m_a"):
        response = client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)
        assert response["model_name"] == model_id
        (out,) = response["outputs"]
        assert out["data"] == [8]
    log = w.tail(400)
    assert log.count("from its snapshot") == 3, log
