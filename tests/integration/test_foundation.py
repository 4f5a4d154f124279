"""The spine end to end: producers -> per-model queues -> batching workers, with real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mesh import (
    AlreadyExists,
    BatchingConfig,
    InvalidId,
    InvalidInput,
    ModelInfo,
    ModelLoadFailed,
    ModelNotFound,
    ModelState,
)
from mesh.tools.launcher import REPO_ROOT, wait_for


def seed_tensor(seed_input: list[float]) -> dict:
    return {"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}


def answer(response: dict) -> int:
    (out,) = [o for o in response["outputs"] if o["name"] in ("predict", "label")]
    return int(out["data"][0])


def sklearn_info(path: Path, **batching) -> ModelInfo:
    return ModelInfo(
        runtime="sklearn",
        uri=f"file://{path}",
        batching=BatchingConfig(**batching) if batching else None,
    )


def test_seed_digits_answer_8_through_meshclient(client, workers, svm_path, seed_input):
    w = workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    assert client.get_model_status("digits").state is ModelState.NOT_LOADED
    response = client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)
    assert response["model_name"] == "digits"
    assert answer(response) == 8
    status = client.get_model_status("digits")
    assert status.state is ModelState.LOADED
    assert [c.worker for c in status.copies] == [client.list_workers()[0].name]
    # numpy input works too, and a batch of rows comes back row for row
    rows = np.array([seed_input, seed_input, seed_input], dtype=np.float32)
    response = client.infer(model_id="digits", inputs=rows).get(timeout=30)
    assert response["outputs"][0]["shape"] == [3]
    assert response["outputs"][0]["data"] == [8, 8, 8]
    # its threads carry their names for `top -H` and /proc (workers/threadnames.py)
    names = {(t / "comm").read_text().strip() for t in Path(f"/proc/{w.popen.pid}/task").iterdir()}
    assert {"mesh-inference", "mesh-watchdog", "mesh-heartbeat", "mesh-wanted", "mesh-fetch_0"} <= names, names


def test_seed_digits_answer_8_through_plain_celery_producer(client, workers, mesh_env, svm_path, seed_input):
    """A producer that knows only Celery: send_task with the mm-model-id header, routed by
    the router in celeryconfig.py, and AsyncResult(id).get() from another process."""
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    script = f"""
import json
from mesh.app import app
from celery.result import AsyncResult
r = app.send_task("mesh.infer", kwargs={{"inputs": [{json.dumps(seed_tensor(seed_input))}]}},
                  headers={{"mm-model-id": "digits"}})
print(json.dumps({{"id": r.id, "response": AsyncResult(r.id, app=app).get(timeout=60)}}))
r2 = app.tasks["mesh.infer"].delay(model_id="digits", inputs=[{json.dumps(seed_tensor(seed_input))}])
print(json.dumps({{"id": r2.id, "response": r2.get(timeout=60)}}))
"""
    env = {**os.environ, **mesh_env, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["response"]["model_name"] == "digits"
        assert answer(line["response"]) == 8
    # the result is readable from this process too, by id only
    from celery.result import AsyncResult

    assert answer(AsyncResult(lines[0]["id"], app=client.app).get(timeout=10)) == 8


def test_plain_producer_unknown_model_fails_at_enqueue(client, mesh_env):
    script = """
from mesh.app import app
from mesh.errors import ModelNotFound
try:
    app.send_task("mesh.infer", kwargs={"inputs": []}, headers={"mm-model-id": "nope"})
except ModelNotFound as e:
    print("ModelNotFound", e)
"""
    env = {**os.environ, **mesh_env, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ModelNotFound model 'nope' not found")


def test_three_models_on_a_worker_with_room_for_two(client, workers, svm_path, model_dir, seed_input):
    from workers.runtimes import get_runtime

    size = get_runtime("sklearn").load(svm_path, sklearn_info(svm_path)).size_bytes
    w = workers("w1", MESH_WORKER_CAPACITY_BYTES=int(size * 2.5))
    ids = ["m_a", "m_b", "m_c"]
    for model_id in ids:
        path = model_dir / f"{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, sklearn_info(path))
    results = []
    for round_ in range(6):
        for model_id in ids:
            results.append((model_id, client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)])))
    for model_id, r in results:
        response = r.get(timeout=90)
        assert response["model_name"] == model_id
        assert answer(response) == 8
    # the cache really was bounded: never three models at once, and evictions happened
    state = client.list_workers()[0]
    assert len(state.models) <= 2
    assert state.used_bytes <= int(size * 2.5)
    assert "evicting" in w.tail(400)
    # requests after the churn are still answered for every model
    for model_id in ids:
        assert answer(client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8


def test_concurrent_requests_are_batched(client, workers, mlp_path, seed_input):
    workers("w1")
    client.register_model("mlp", sklearn_info(mlp_path, max_batch_size=32, max_batch_delay_ms=20))
    client.ensure_loaded("mlp", sync=True, timeout=60)
    before = client.list_workers()[0]
    results = [client.infer(model_id="mlp", inputs=[seed_tensor(seed_input)]) for _ in range(200)]
    assert all(answer(r.get(timeout=60)) == 8 for r in results)

    def stats():
        w = client.list_workers()[0]
        return w if w.requests_total - before.requests_total >= 200 else None

    after = wait_for(stats, timeout=10, what="heartbeat counting 200 requests")
    requests = after.requests_total - before.requests_total
    batches = after.batches_total - before.batches_total
    assert requests == 200
    assert requests / batches > 1.0, f"{requests} requests in {batches} batches"
    # every message was acked (batch acks share a round trip): nothing left to redeliver
    r = client.store.r
    unacked = client.keys.kombu_prefix + "unacked"
    wait_for(lambda: r.hlen(unacked) == 0 and r.zcard(unacked + "_index") == 0, timeout=10,
             what="kombu's unacked index to empty")


def test_unknown_ids_raise_at_once(client):
    with pytest.raises(ModelNotFound):
        client.infer(model_id="missing", inputs=np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(ModelNotFound):
        client.infer(vmodel_id="missing", inputs=np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(InvalidId):
        client.infer(model_id="bad\x00id", inputs=np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(ModelNotFound):
        client.ensure_loaded("missing")
    assert client.get_model_status("missing").state is ModelState.NOT_FOUND


def test_corrupt_model_fails_its_requests_and_the_worker_keeps_serving(
    client, workers, svm_path, model_dir, seed_input
):
    workers("w1")
    bad = model_dir / "corrupt.joblib"
    bad.write_bytes(b"this is not a joblib file")
    client.register_model("good", sklearn_info(svm_path))
    client.register_model("broken", sklearn_info(bad))
    queued = [client.infer(model_id="broken", inputs=[seed_tensor(seed_input)]) for _ in range(3)]
    for r in queued:
        with pytest.raises(ModelLoadFailed) as err:
            r.get(timeout=60)
        assert "corrupt.joblib" in str(err.value)
    status = client.get_model_status("broken")
    assert status.state is ModelState.LOADING_FAILED
    assert status.errors and "corrupt.joblib" in status.errors[0]
    assert status.failed_copies[0].worker == client.list_workers()[0].name
    # with every worker failed recently, new requests fail fast at enqueue with the same error
    with pytest.raises(ModelLoadFailed):
        client.infer(model_id="broken", inputs=[seed_tensor(seed_input)]).get(timeout=30)
    # and the worker still serves other models
    assert answer(client.infer(model_id="good", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8


def test_missing_file_is_a_load_failure(client, workers, model_dir, seed_input):
    workers("w1")
    client.register_model("ghost", sklearn_info(model_dir / "does-not-exist.joblib"))
    status = client.ensure_loaded("ghost", sync=True, timeout=60)
    assert status.state is ModelState.LOADING_FAILED
    assert "not found" in status.errors[0]


def test_wrong_shape_fails_only_its_own_request(client, workers, svm_path, seed_input):
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=16, max_batch_delay_ms=50))
    client.ensure_loaded("digits", sync=True, timeout=60)
    good = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
    bad = client.infer(model_id="digits", inputs=[{"name": "predict", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}])
    garbage = client.app.send_task(
        "mesh.infer", kwargs={"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]},
        queue=client.keys.model_queue("digits"),
    )
    more = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
    with pytest.raises(InvalidInput) as err:
        bad.get(timeout=30)
    assert "[1, 10]" in str(err.value) and "64" in str(err.value)
    with pytest.raises(InvalidInput):
        garbage.get(timeout=30)
    assert all(answer(r.get(timeout=30)) == 8 for r in good + more)


def test_registry_semantics(client, workers, svm_path, mlp_path, seed_input):
    info = sklearn_info(svm_path)
    client.register_model("digits", info)
    client.register_model("digits", info)  # identical: idempotent
    with pytest.raises(AlreadyExists):
        client.register_model("digits", sklearn_info(mlp_path))
    with pytest.raises(InvalidId):
        client.register_model("x" * 513, info)
    assert [m.model_id for m in client.list_models()] == ["digits"]

    w = workers("w1")
    status = client.ensure_loaded("digits", sync=True, timeout=60)
    assert status.state is ModelState.LOADED and len(status.copies) == 1
    # ensure_loaded never adds a second copy
    assert len(client.ensure_loaded("digits").copies) == 1
    assert client.list_workers()[0].name == w.full_name

    client.unregister_model("digits")
    client.unregister_model("digits")  # idempotent
    assert client.get_model_status("digits").state is ModelState.NOT_FOUND
    wait_for(lambda: not client.list_workers()[0].models, timeout=15, what="copy unloaded")
    with pytest.raises(ModelNotFound):
        client.infer(model_id="digits", inputs=[seed_tensor(seed_input)])
