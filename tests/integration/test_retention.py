"""Retention end to end: which model a full worker evicts, under each MESH_EVICTION_POLICY."""

from __future__ import annotations

import shutil

import pytest

from mesh import ModelInfo
from mesh.tools.launcher import wait_for


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


def test_a_load_holds_a_fresh_copy_beyond_capacity_instead_of_evicting_a_used_model(
    client, workers, svm_path, model_dir, seed_input
):
    """Room for two: m_hot (used six times) and a fresh copy nobody has asked for yet (a
    proactive load). A third model's load must not evict m_hot in the fresh copy's place: the
    worker holds all three (MESH_FRESH_OVERCOMMIT_FRACTION), then comes back to capacity by
    evicting the fresh copy once it is no longer fresh (the heartbeat's trim, after FRESH_S).
    A fresh copy that answers is evicted by the policy again (the trim after its first batch)."""
    from mesh.control.commands import send_command
    from mesh.models import Command
    from workers.retention import FRESH_S
    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{svm_path}")
    size = get_runtime("sklearn").load(svm_path, info).size_bytes
    # room for two models, and for one fresh copy above that
    w = workers("w1", MESH_WORKER_CAPACITY_BYTES=int(size * 2.5), MESH_FRESH_OVERCOMMIT_FRACTION=0.5)
    for model_id in ("m_hot", "m_fresh", "m_new", "m_fresh2", "m_last"):
        path = model_dir / f"defer_{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))

    def infer(model_id: str) -> None:
        assert client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)["model_name"] == model_id

    def loaded() -> set[str]:
        (state,) = client.list_workers()
        return {m.model_id for m in state.models}

    def load(model_id: str, expect: set[str]) -> None:
        send_command(client.store, w.full_name, Command(op="load", model_id=model_id))
        wait_for(lambda: loaded() == expect, timeout=30, what=f"{model_id} loaded proactively")

    for _ in range(6):
        infer("m_hot")
    load("m_fresh", {"m_hot", "m_fresh"})
    infer("m_new")
    wait_for(lambda: loaded() == {"m_hot", "m_fresh", "m_new"}, timeout=10, what="three copies held")
    (state,) = client.list_workers()
    assert state.used_bytes > state.capacity_bytes  # by the fresh copy, for now
    wait_for(lambda: loaded() == {"m_hot", "m_new"}, timeout=FRESH_S + 15, what="m_fresh evicted once stale")

    load("m_fresh2", {"m_hot", "m_fresh2"})  # m_new (asked once) made room: nothing fresh to defer to
    infer("m_last")  # defers to m_fresh2 again
    infer("m_fresh2")  # its first answer ends the deferral: m_last (used once, longer ago) goes
    wait_for(lambda: loaded() == {"m_hot", "m_fresh2"}, timeout=FRESH_S + 15, what="back to capacity")
    (state,) = client.list_workers()
    assert state.used_bytes <= state.capacity_bytes
    assert "evicting m_hot" not in w.tail(2000)


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
    # a reload answers the requests it held before it logs its load
    wait_for(lambda: w.tail(400).count("from its snapshot") == 3, 10, what="three reloads from their snapshots")
