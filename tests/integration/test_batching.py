"""Batching and queue policy with real workers: micro-batches, queue limits, timeouts,
priorities, fairness between models, error isolation, precedence, and Flower's view."""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests
from celery.exceptions import TaskRevokedError

from mesh import BatchingConfig, InferenceError, InvalidInput, ModelInfo
from mesh.client import raise_for_item
from mesh.errors import QueueFull
from mesh.tools.launcher import free_port, start_flower, wait_flower_ready, wait_for

from .test_foundation import answer, seed_tensor, sklearn_info


def test_infer_many_answers_every_item_and_fails_bad_ones_alone(client, workers, svm_path, seed_input):
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    good = [seed_tensor(seed_input)]
    bad_shape = [{"name": "predict", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]
    rows = np.array([seed_input] * 3, dtype=np.float32)
    with_nan = np.array([seed_input], dtype=np.float32)
    with_nan[0, 5] = np.nan  # the SVC refuses it: the client's error, not INTERNAL
    response = client.infer_many(model_id="digits", inputs=[good, bad_shape, rows, good, with_nan]).get(timeout=60)
    assert response["model_name"] == "digits"
    results = response["results"]
    assert len(results) == 5
    assert results[4]["error"]["type"] == "InvalidInput" and "NaN or infinity" in results[4]["error"]["message"]
    assert results[0]["outputs"][0]["data"] == [8]
    assert results[1]["error"]["type"] == "InvalidInput" and "[1, 3]" in results[1]["error"]["message"]
    assert results[2]["outputs"][0]["data"] == [8, 8, 8]
    assert raise_for_item(results[3])["outputs"][0]["data"] == [8]
    with pytest.raises(InvalidInput):
        raise_for_item(results[1])
    with pytest.raises(Exception):
        client.infer_many(model_id="digits", inputs=[])


def test_raw_tensors_reach_the_model_as_the_arrays_that_were_sent(client, workers, svm_path, seed_input, redis_url,
                                                                   prefix):  # fmt: skip
    """MESH_RAW_TENSORS (the default): arrays and micro-batch items travel as base64 bytes,
    and a raw tensor from any Celery producer is read too; a bad raw item fails alone. The
    answers are those of JSON numbers (a client with raw tensors off)."""
    import base64

    from mesh import MeshClient
    from mesh.broker.publisher import kwargs_repr
    from mesh.settings import MeshSettings

    workers("w1")
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=8, max_batch_delay_ms=20))
    row = np.array([seed_input], dtype=np.float32)
    rows = np.repeat(row, 3, axis=0)
    sent = []
    original = client._publisher.prepare

    def spy(task_id, queue, kwargs, **kw):
        sent.append(kwargs)
        return original(task_id, queue, kwargs, **kw)

    client._publisher.prepare = spy
    assert client.infer(model_id="digits", inputs=rows).get(timeout=60)["outputs"][0]["data"] == [8, 8, 8]
    listed = [seed_tensor(seed_input)]
    alike = client.infer_many(model_id="digits", inputs=[listed] * 4).get(timeout=60)  # stacked, then cut
    assert [r["outputs"][0]["data"] for r in alike["results"]] == [[8]] * 4
    many = client.infer_many(model_id="digits", inputs=[listed, rows, listed]).get(timeout=60)
    assert [r["outputs"][0]["data"] for r in many["results"]] == [[8], [8, 8, 8], [8]]
    is_raw = lambda t: set(t) == {"name", "shape", "datatype", "raw"}  # noqa: E731
    assert is_raw(sent[0]["inputs"][0]) and all(is_raw(item[0]) for item in sent[1]["items"])
    assert is_raw(sent[2]["items"][1][0]) and sent[2]["items"][0] == listed  # clean floats go as they came
    assert "raw" not in kwargs_repr(sent[0])  # Flower shows shapes, not the bytes

    bad = {**sent[0]["inputs"][0], "raw": "not base64!"}
    with pytest.raises(InvalidInput, match="not valid base64"):  # MeshClient checks before sending
        client.infer_many(model_id="digits", inputs=[[bad], listed])
    queue = client.keys.model_queue("digits")
    mixed = client.app.send_task("mesh.infer", kwargs={"items": [[bad], listed]}, queue=queue)
    mixed = mixed.get(timeout=60)["results"]
    assert mixed[0]["error"]["type"] == "InvalidInput" and "not valid base64" in mixed[0]["error"]["message"]
    assert mixed[1]["outputs"][0]["data"] == [8]

    raw = base64.b64encode(row.astype("<f4").tobytes()).decode()
    r = client.app.send_task("mesh.infer", kwargs={"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                                               "raw": raw}]},
                             queue=queue)  # fmt: skip
    assert answer(r.get(timeout=60)) == 8

    listed_client = MeshClient(settings=MeshSettings(redis_url=redis_url, prefix=prefix, raw_tensors=False))
    try:
        assert listed_client.infer(model_id="digits", inputs=rows).get(timeout=60)["outputs"][0]["data"] == [8, 8, 8]
    finally:
        listed_client.close()


def test_a_full_queue_rejects_new_requests_at_once(client, svm_path, seed_input):
    # no worker: requests wait in Redis, so the queue really fills
    client.register_model("digits", sklearn_info(svm_path, max_queue_size=3))
    for _ in range(3):
        client.infer(model_id="digits", inputs=[seed_tensor(seed_input)])
    with pytest.raises(QueueFull) as err:
        client.infer(model_id="digits", inputs=[seed_tensor(seed_input)])
    assert "max_queue_size" in str(err.value)


def test_expired_requests_are_never_run(client, workers, svm_path, seed_input):
    client.register_model("digits", sklearn_info(svm_path, default_timeout_ms=60_000))
    short = client.infer(model_id="digits", inputs=[seed_tensor(seed_input)], timeout_ms=300)
    by_default = client.infer(model_id="digits", inputs=[seed_tensor(seed_input)])  # 60 s
    deadline = time.time() + 0.3
    wait_for(lambda: time.time() > deadline + 0.2, timeout=5, what="the short timeout to pass")
    workers("w1")  # only now can anything run
    with pytest.raises(TaskRevokedError):
        short.get(timeout=60)
    assert short.state == "REVOKED"
    assert answer(by_default.get(timeout=60)) == 8


def test_high_priority_overtakes_normal_traffic(client, workers, svm_path, seed_input):
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=1))
    normal = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(30)]
    urgent = client.infer(model_id="digits", inputs=[seed_tensor(seed_input)], priority="high")
    with pytest.raises(Exception):
        client.infer(model_id="digits", inputs=[seed_tensor(seed_input)], priority="urgent!")
    workers("w1")
    assert answer(urgent.get(timeout=60)) == 8
    for r in normal:
        r.get(timeout=60)
    done = sorted(r.date_done for r in normal)
    # sent last, answered among the first: it was taken from the high lane
    assert urgent.date_done <= done[2]


def test_one_models_flood_does_not_starve_another(client, workers, svm_path, seed_input, tmp_path):
    from tests.faults.helpers import X, slow_info

    # 50 ms per batch of 4: 400 requests are five seconds of work, sent in about one, so a
    # deep backlog is queued when the quiet model's requests arrive (with a fast model the
    # worker keeps pace with the sender and there is nothing to starve behind)
    client.register_model("flood", slow_info(tmp_path, "flood", delay=0.05, max_batch_size=4))
    client.register_model("quiet", sklearn_info(svm_path, max_batch_size=4))
    workers("w1")
    client.ensure_loaded("flood", sync=True, timeout=60)
    client.ensure_loaded("quiet", sync=True, timeout=60)
    flood = [client.infer(model_id="flood", inputs=[X]) for _ in range(400)]
    quiet = [client.infer(model_id="quiet", inputs=[seed_tensor(seed_input)]) for _ in range(3)]
    backlog = client.store.queue_depth("flood", [0, 5])
    assert backlog >= 100, f"the premise: a backlog when the quiet requests arrive ({backlog})"
    for r in quiet + flood:
        r.get(timeout=120)
    # the quiet requests did not wait for the flood's backlog to drain: most of it was
    # answered after them
    quiet_done = max(r.date_done for r in quiet)
    after = sum(1 for r in flood if r.date_done > quiet_done)
    assert after >= backlog // 2, (after, backlog)


def test_a_raising_batch_is_bisected_to_the_guilty_requests(client, workers):
    workers("w1")
    client.register_model(
        "picky",
        ModelInfo(runtime="python", uri="file:///dev/null", python_class="tests.integration.pyclasses:Picky",
                  batching=BatchingConfig(max_batch_size=16, max_batch_delay_ms=200)),
    )
    client.ensure_loaded("picky", sync=True, timeout=60)
    values = [1.0, 2.0, -1.0, 3.0, 4.0, -5.0, 6.0, 7.0]
    results = [client.infer(model_id="picky", inputs=np.array([[v]], dtype=np.float32)) for v in values]
    for v, r in zip(values, results):
        if v < 0:
            with pytest.raises(InferenceError) as err:
                r.get(timeout=60)
            assert "negative input rejected by Picky" in str(err.value)
        else:
            assert r.get(timeout=60)["outputs"][0]["data"] == [2 * v]
    # they really shared batches (so the bisection is what saved the good ones)
    w = wait_for(lambda: (w := client.list_workers()[0]).requests_total >= len(values) and w,
                 timeout=10, what="heartbeat counting the requests")
    assert w.batches_total < w.requests_total


def test_effective_config_shows_each_value_and_its_level(client, svm_path, monkeypatch):
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=8))
    cfg = client.get_effective_config("digits")
    assert cfg.values["max_batch_size"].value == 8 and cfg.values["max_batch_size"].source == "api"
    assert cfg.values["max_batch_delay_ms"].source in ("global", "default")
    assert cfg.values["max_queue_size"].value == 0
    assert set(cfg.values) >= {"preferred_batch_sizes", "default_timeout_ms", "default_priority"}


def test_every_request_shows_in_flower(client, workers, mesh_env, svm_path, seed_input, tmp_path):
    workers("w1")
    port = free_port()
    flower = start_flower(mesh_env, tmp_path / "logs", port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_flower_ready(port, flower)
        client.register_model("digits", sklearn_info(svm_path))
        ids = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
        bad = client.infer(model_id="digits", inputs=[{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}])
        for r in ids:
            r.get(timeout=60)
        with pytest.raises(InvalidInput):
            bad.get(timeout=60)

        def tasks():
            resp = requests.get(f"{base}/api/tasks", timeout=5)
            resp.raise_for_status()
            seen = resp.json()
            wanted = [r.id for r in ids] + [bad.id]
            if all(seen.get(i, {}).get("state") in ("SUCCESS", "FAILURE") for i in wanted):
                return seen
            return None

        seen = wait_for(tasks, timeout=60, what="flower to see every request finished")
        for r in ids:
            task = seen[r.id]
            assert task["name"] == "mesh.infer[digits]"
            assert task["state"] == "SUCCESS"
            assert task["received"] and task["started"] and task["succeeded"]
            assert task["runtime"] is not None
        assert seen[bad.id]["state"] == "FAILURE" and "InvalidInput" in seen[bad.id]["exception"]
    finally:
        flower.stop()
