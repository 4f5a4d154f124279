"""workers/metrics.py: outcome labels, a registry per worker, and a metrics server that a taken
port cannot stop and that close() ends (no worker, no Redis)."""

from __future__ import annotations

import socket
import time
import urllib.request

import prometheus_client
import pytest

from mesh.errors import DeadlineExceeded, InvalidInput, ModelLoadFailed, ModelNotFound, RequestTooLarge
from workers.metrics import UNKNOWN_MODEL, WorkerMetrics, outcome_of
from mesh.tools.launcher import free_port


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "success"),
        (InvalidInput("bad tensor"), "invalid_input"),
        (ModelNotFound("gone"), "model_not_found"),
        (RequestTooLarge("big"), "request_too_large"),
        (DeadlineExceeded("late"), "deadline_exceeded"),
        (ModelLoadFailed("boom"), "model_load_failed"),
        (ValueError("plain"), "value_error"),
    ],
)
def test_outcome_is_success_or_the_error_class_in_snake_case(error, outcome):
    assert outcome_of(error) == outcome


def requests_value(m: WorkerMetrics, model: str, outcome: str) -> float | None:
    return m.registry.get_sample_value("mesh_requests_total", {"model": model, "outcome": outcome})


def test_each_worker_has_its_own_registry():
    a, b = WorkerMetrics("a@test"), WorkerMetrics("b@test")  # a shared registry would raise here
    try:
        a.requests.labels("m", "success").inc(3)
        assert requests_value(a, "m", "success") == 3
        assert requests_value(b, "m", "success") is None
        # nothing leaks into the process-wide default registry
        assert prometheus_client.REGISTRY.get_sample_value(
            "mesh_requests_total", {"model": "m", "outcome": "success"}) is None
        assert a.registry.get_sample_value("mesh_worker_info", {"worker": "a@test"}) == 1
        assert a.registry.get_sample_value("mesh_worker_info", {"worker": "b@test"}) is None
        assert b.registry.get_sample_value("mesh_worker_info", {"worker": "b@test"}) == 1
    finally:
        a.close()
        b.close()


def test_close_without_a_server_is_safe_and_idempotent():
    m = WorkerMetrics("w@test", port=0)
    assert m._server is None
    m.close()
    m.close()


def test_served_metrics_show_this_worker_and_close_stops_the_server():
    port = free_port()
    m = WorkerMetrics("w@test", port=port)
    try:
        assert m._server is not None
        m.requests.labels("digits", "invalid_input").inc()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'mesh_worker_info{worker="w@test"} 1.0' in text
        assert 'mesh_requests_total{model="digits",outcome="invalid_input"} 1.0' in text
    finally:
        m.close()
    assert m._server is None
    m.close()  # twice is fine


def test_a_taken_port_does_not_stop_the_worker():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        m = WorkerMetrics("w@test", port=port)  # logs the error instead of raising
        try:
            assert m._server is None
            m.requests.labels("m", "success").inc()  # metrics still count
            assert requests_value(m, "m", "success") == 1
        finally:
            m.close()


def _use(m: WorkerMetrics, model: str) -> None:
    """Every per-model series a served model gets (a load, a batch, an unload)."""
    m.loads.labels(model, "success").inc()
    m.load_seconds.labels(model).observe(0.1)
    m.restores.labels(model).inc()
    m.requests.labels(model, "success").inc()
    m.requests.labels(model, "invalid_input").inc()
    m.items.labels(model).inc()
    m.queue_seconds.labels(model).observe(0.001)
    m.compute_seconds.labels(model).observe(0.001)
    m.batch_size.labels(model).observe(4)
    m.unloads.labels(model, "evicted").inc()


def test_series_of_models_gone_for_the_retention_time_are_removed():
    """Issue 21, finding 8: series per model id were kept forever."""
    m = WorkerMetrics("w@test", retention_s=60.0)
    try:
        m.sweep(["kept"], now=0.0)
        _use(m, "kept")
        baseline = m.series()
        for i in range(20):  # models come and go
            model = f"m{i}"
            m.sweep(["kept", model], now=float(i))
            _use(m, model)
        assert m.series() > baseline
        m.sweep(["kept"], now=70.0)  # still within the retention time of the last ones
        assert m.registry.get_sample_value("mesh_requests_total", {"model": "m19", "outcome": "success"}) == 1
        m.sweep(["kept"], now=80.0)  # every one gone for more than 60 s
        assert m.series() == baseline
        assert m.registry.get_sample_value("mesh_requests_total", {"model": "m0", "outcome": "success"}) is None
        assert m.registry.get_sample_value("mesh_requests_total", {"model": "kept", "outcome": "success"}) == 1
    finally:
        m.close()


def test_batch_series_are_looked_up_once_and_forgotten_with_their_model():
    m = WorkerMetrics("w@test", retention_s=60.0)
    try:
        m.sweep(["a"], now=0.0)
        series = m.batch_series("a")
        assert m.batch_series("a") is series
        series.success.inc(2)
        series.batch_size.observe(3)
        sample = m.registry.get_sample_value
        assert sample("mesh_requests_total", {"model": "a", "outcome": "success"}) == 2
        assert sample("mesh_batch_size_count", {"model": "a"}) == 1
        m.sweep([], now=100.0)  # gone: its series removed...
        assert sample("mesh_requests_total", {"model": "a", "outcome": "success"}) is None
        again = m.batch_series("a")  # ...and served again later: new series, exposed
        assert again is not series
        again.success.inc()
        assert sample("mesh_requests_total", {"model": "a", "outcome": "success"}) == 1
    finally:
        m.close()


def test_a_noted_model_that_never_served_is_forgotten_too():
    m = WorkerMetrics("w@test", retention_s=1.0)
    try:
        baseline = m.series()
        m.note("broken")  # its load failed: a series, but never active
        m.loads.labels("broken", "failed").inc()
        assert m.series() > baseline
        m.sweep([], now=time.monotonic() + 2.0)
        assert m.series() == baseline
    finally:
        m.close()


def test_label_values_come_only_from_models_served_here():
    """An id read from a message's routing key (the producer's) is no label of its own."""
    m = WorkerMetrics("w@test", retention_s=60.0)
    try:
        assert m.model_label("forged-id") == UNKNOWN_MODEL
        assert m.model_label(None) == UNKNOWN_MODEL
        m.sweep(["served"], now=0.0)
        assert m.model_label("served") == "served"
        m.sweep([], now=61.0)
        assert m.model_label("served") == UNKNOWN_MODEL
    finally:
        m.close()
