"""A worker's Prometheus endpoint, scraped while it serves (issue 7's metric set)."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mesh import InvalidInput
from mesh.tools.launcher import free_port, wait_for

from .test_foundation import seed_tensor, sklearn_info


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_metrics(client, workers, svm_path, seed_input):
    port = free_port()
    workers("w1", MESH_METRICS_PORT=port)
    client.register_model("digits", sklearn_info(svm_path))
    results = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(20)]
    bad = client.infer(model_id="digits", inputs=[{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}])
    for r in results:
        r.get(timeout=60)
    with pytest.raises(InvalidInput):
        bad.get(timeout=60)
    m = wait_for(lambda: (m := scrape(port)).get(("mesh_worker_used_bytes", ())) and m,
                 timeout=15, what="a heartbeat to set the gauges")
    assert m[("mesh_requests_total", (("model", "digits"), ("outcome", "success")))] == 20
    assert m[("mesh_requests_total", (("model", "digits"), ("outcome", "invalid_input")))] == 1
    assert m[("mesh_model_loads_total", (("model", "digits"), ("outcome", "success")))] == 1
    assert m[("mesh_model_load_seconds_count", (("model", "digits"),))] == 1
    assert m[("mesh_model_load_wait_seconds_count", ())] == 1
    assert m[("mesh_batch_size_count", (("model", "digits"),))] >= 1
    assert m[("mesh_batch_size_sum", (("model", "digits"),))] == 20
    assert m[("mesh_request_queue_seconds_count", (("model", "digits"),))] == 20
    assert m[("mesh_request_compute_seconds_count", (("model", "digits"),))] == 20
    assert m[("mesh_cache_lookups_total", (("result", "miss"),))] == 1
    assert m[("mesh_models_loaded", ())] == 1
    assert 0 < m[("mesh_worker_used_bytes", ())] <= m[("mesh_worker_capacity_bytes", ())]


def test_task_and_batch_events_reach_an_event_receiver(client, workers, svm_path, seed_input):
    """What Flower sees: per request task-received/started/succeeded under mesh.infer[<model>],
    and one mesh-batch event per batch (Celery's receiver, buffered `*.multi` lists included)."""
    import threading

    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True)
    events: list[dict] = []
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with client.app.connection_for_read() as conn:
            recv = client.app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set():
                    return

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    # the receiver listens once a probe event of our own comes back through it
    with client.app.events.default_dispatcher() as probe:
        wait_for(lambda: probe.send("mesh-probe") or any(e["type"] == "mesh-probe" for e in events),
                 10, interval=0.1, what="the event receiver to listen")  # fmt: skip
    results = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(30)]
    ids = {r.id for r in results}
    for r in results:
        r.get(timeout=60)

    def batches() -> list[dict]:
        return [e for e in events if e["type"] == "mesh-batch" and e["model"] == "digits"]

    wait_for(lambda: sum(e["size"] for e in batches()) >= 30, 20, what="mesh-batch events for 30 requests")
    stop.set()
    assert sum(e["size"] for e in batches()) == 30
    assert all(e["reason"] and e["failed"] == 0 and e["compute_ms"] >= 0 for e in batches())
    by_type: dict[str, set[str]] = {}
    for e in events:
        if e.get("uuid") in ids:
            by_type.setdefault(e["type"], set()).add(e["uuid"])
    for kind in ("task-received", "task-started", "task-succeeded"):
        assert by_type.get(kind) == ids, kind
    received = [e for e in events if e["type"] == "task-received" and e.get("uuid") in ids]
    assert {e["name"] for e in received} == {"mesh.infer[digits]"}


def model_series(m: dict[tuple[str, tuple], float]) -> dict[str, int]:
    """model label value -> samples carrying it."""
    out: dict[str, int] = {}
    for _, labels in m:
        model = dict(labels).get("model")
        if model is not None:
            out[model] = out.get(model, 0) + 1
    return out


def test_series_of_models_that_came_and_went_are_removed(client, workers, tmp_path):
    """Issue 21, finding 8: ~18.5 KiB of series per model id ever seen, kept forever. With
    MESH_METRICS_RETENTION_S=1 a model's series go a heartbeat or two after it left."""
    from tests.faults.helpers import X, slow_info

    port = free_port()
    workers("w1", MESH_METRICS_PORT=port, MESH_METRICS_RETENTION_S=1)

    def come_and_go(model_id: str) -> None:
        client.register_model(model_id, slow_info(tmp_path, model_id))
        assert client.infer(model_id=model_id, inputs=[X]).get(timeout=60)["outputs"][0]["data"] == [10.0]
        assert model_series(scrape(port)).get(model_id, 0) > 10  # requests, histograms, loads
        client.unregister_model(model_id)

    come_and_go("first")  # the worker-wide series any model creates (cache lookups) exist now
    baseline = wait_for(lambda: (m := scrape(port)) and not model_series(m) and len(m),
                        timeout=60, what="the first model's series to go")  # fmt: skip
    for i in range(4):
        come_and_go(f"m{i}")
    assert wait_for(lambda: (m := scrape(port)) and not model_series(m) and len(m),
                    timeout=60, what="every model's series to go") == baseline  # fmt: skip
