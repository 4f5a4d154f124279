"""Prometheus metrics of one worker, modelled on Triton's set
(triton-inference-server/server docs/user_guide/metrics.md).

Served on MESH_METRICS_PORT (0: off) by prometheus-client's own HTTP server thread, from a
registry of this worker's own, so several workers in one process (tests) never collide.
Labels are the concrete model id and a small closed set of outcomes. A model id becomes a
label value only once this worker serves it (`active`, from the model manager and the
batcher); an id read from a message (its routing key: producer-controlled) that is not one of
those counts under UNKNOWN_MODEL. The series of a model that left are removed once it has been
gone for MESH_METRICS_RETENTION_S (`sweep`, on every heartbeat): cardinality is the number of
models the worker served within that time, not every id it ever saw (issue 21, finding 8).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("mesh.worker.metrics")

# seconds: from 100 us (a batch of a small model) to 60 s (a cold load under load)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The label of a model id this worker does not serve (a forged or stale routing key).
UNKNOWN_MODEL = "_unknown"


# Why a message was dropped or refused before it could be served: a closed set, never a value
# taken from the message (docs/operations.md). The transport's (mesh/broker/transport.py), the
# strategies' (workers/strategy.py) and the results path's (workers/inference.py).
REJECT_REASONS = (
    "not_json",  # a list item that does not decode as JSON (or is nested too deep)
    "bad_envelope",  # JSON, but not a kombu envelope with fields of the right types
    "undeliverable",  # kombu or Celery raised while handing it to its strategy
    "malformed",  # a task message that does not decode or validate, or is too large (answered when it has an id)
    "not_a_model_queue",  # a mesh.infer on a queue that is not a model queue, for no model served here
    "unexpected",  # a strategy raised on it: rejected, the worker carries on
    "unanswerable",  # its result cannot be stored under its id: acked without an answer
)


def outcome_of(error: BaseException | None) -> str:
    """success, or the failure reason: the error's class in snake case (invalid_input, ...)."""
    if error is None:
        return "success"
    name = type(error).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class BatchSeries(NamedTuple):
    """The series of one model that every answered batch updates (`WorkerMetrics.batch_series`)."""

    success: Any  # mesh_requests{outcome="success"}
    queue_seconds: Any
    compute_seconds: Any
    items: Any
    batch_size: Any


class WorkerMetrics:
    def __init__(self, worker: str, port: int = 0, retention_s: float = 600.0, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mesh_requests", "Requests answered, by model and outcome (success or the failure "
            "reason; expired: revoked before running; requeued: handed back when the model left)",
            ["model", "outcome"], registry=r)
        self.items = Counter("mesh_items", "Items predicted (a micro-batch message counts each item)",
                             ["model"], registry=r)
        self.queue_seconds = Histogram(
            "mesh_request_queue_seconds", "From the producer's send to the start of its batch's predict",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "mesh_request_compute_seconds", "Predict time of the batch a request was part of",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mesh_batch_size", "Items per batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.loads = Counter("mesh_model_loads", "Model loads by outcome (success, failed, refused)",
                             ["model", "outcome"], registry=r)
        self.restores = Counter("mesh_model_snapshot_restores", "Successful loads read from the "
                                "worker's reload snapshot instead of the model's files", ["model"], registry=r)
        self.load_seconds = Histogram("mesh_model_load_seconds", "Time to load a model",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.load_wait_seconds = Histogram(
            "mesh_model_load_wait_seconds", "Time a load waited in the worker's line of loads "
            "(from the load command to its start, excluding its own fetch and load)",
            buckets=LOAD_WAIT_BUCKETS, registry=r)
        self.unloads = Counter("mesh_model_unloads", "Model unloads by reason (evicted, unregistered, requested)",
                               ["model", "reason"], registry=r)
        self.cache = Counter(
            "mesh_cache_lookups", "Requests for a model already loaded here (hit) and loads of "
            "a model that was not (miss)", ["result"], registry=r)
        self.rejected = Counter(
            "mesh_rejected_messages", "Messages dropped or refused before they could be served, by "
            "reason (a closed set: " + ", ".join(REJECT_REASONS) + ")", ["reason"], registry=r)
        for reason in REJECT_REASONS:  # every series exists from the start, at 0
            self.rejected.labels(reason)
        self.rejections = 0  # all reasons, a plain count (workers/collector.py reads it)
        self.capacity_bytes = Gauge("mesh_worker_capacity_bytes", "Bytes of models this worker may hold", registry=r)
        self.used_bytes = Gauge("mesh_worker_used_bytes", "Bytes of loaded (and loading) models", registry=r)
        self.models_loaded = Gauge("mesh_models_loaded", "Models loaded on this worker", registry=r)
        self.buffered_bytes = Gauge("mesh_buffered_bytes", "Bytes of the requests buffered now "
                                    "(their JSON bodies; bounded by MESH_MAX_BUFFERED_BYTES)", registry=r)
        self.buffered_bytes_max = Gauge("mesh_buffered_bytes_max", "The most bytes of requests "
                                        "buffered at once since the worker started", registry=r)
        self.dead_letters = Gauge(
            "mesh_dead_letters", "Messages in the mesh's dead-letter list (read every heartbeat)", registry=r)
        self.dead_lettered = Counter(
            "mesh_dead_lettered", "Messages this worker dead-lettered instead of delivering them again",
            registry=r)
        self.failover_restored = Counter(
            "mesh_failover_restored", "Unacked messages of dead worker processes this worker put back "
            "on their queues", registry=r)
        self.info = Gauge("mesh_worker_info", "Always 1; labels identify the worker", ["worker"], registry=r)
        self.info.labels(worker=worker).set(1)
        # every metric with a "model" label: the ones `sweep` removes a model's series from
        self._per_model = [self.requests, self.items, self.queue_seconds, self.compute_seconds,
                           self.batch_size, self.loads, self.restores, self.load_seconds, self.unloads]
        self.cache_hits = self.cache.labels("hit")
        # model id -> its BatchSeries: prometheus-client's `labels()` costs about what an
        # observation does, and a batch made five of them (1.5-1.7 % of a worker's interpreter
        # time at closedloop svc1 and zipf)
        self._batch_series: dict[str, BatchSeries] = {}
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._last_active: dict[str, float] = {}  # model id -> monotonic time last seen served
        self.port = port
        self._server = None
        if port:
            try:
                # no authentication: bound where the operator says (MESH_METRICS_ADDR), loopback
                # by default, so that only who may reach that address reads per-model figures
                self._server, _ = start_http_server(port, addr=addr, registry=r)
                log.info("metrics on %s:%d/metrics", addr, port)
            except OSError as exc:  # a taken port must not stop the worker from serving
                log.error("cannot serve metrics on port %d: %s", port, exc)

    def reject(self, reason: str) -> None:
        """Count a dropped or refused message; a reason outside the closed set counts as unexpected."""
        self.rejected.labels(reason if reason in REJECT_REASONS else "unexpected").inc()
        self.rejections += 1

    def model_label(self, model_id: str | None) -> str:
        """`model_id` as a label value when this worker serves it (or did within the retention
        time), else UNKNOWN_MODEL: for ids read from a message rather than from a served model."""
        with self._lock:
            return model_id if model_id and model_id in self._last_active else UNKNOWN_MODEL

    def note(self, model_id: str) -> None:
        """`model_id` (a registered id) gets series now: `sweep` removes them in time even if
        the model never becomes active here (a load that failed)."""
        with self._lock:
            self._last_active.setdefault(model_id, time.monotonic())

    def sweep(self, active: Iterable[str], now: float | None = None) -> list[str]:
        """Mark `active` models (loaded, loading or buffered here) as seen now, and remove every
        series of the models not seen for `retention_s`. Returns the models forgotten."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for model_id in active:
                self._last_active[model_id] = now
            gone = [m for m, t in self._last_active.items() if now - t >= self.retention_s]
            for model_id in gone:
                del self._last_active[model_id]
        for model_id in gone:
            self.forget(model_id)
        return gone

    def batch_series(self, model_id: str) -> BatchSeries:
        """`model_id`'s series that each answered batch updates, looked up once (until
        `forget`). Any thread: two looking it up at once get the same series."""
        series = self._batch_series.get(model_id)
        if series is None:
            series = self._batch_series[model_id] = BatchSeries(
                self.requests.labels(model_id, "success"), self.queue_seconds.labels(model_id),
                self.compute_seconds.labels(model_id), self.items.labels(model_id),
                self.batch_size.labels(model_id),
            )  # fmt: skip
        return series

    def forget(self, model_id: str) -> None:
        """Remove every series labelled with `model_id` (prometheus-client >= 0.20:
        `MetricWrapperBase.remove_by_labels`, a partial label match)."""
        self._batch_series.pop(model_id, None)
        for metric in self._per_model:
            metric.remove_by_labels({"model": model_id})

    def series(self) -> int:
        """Samples the registry exposes (for tests and the docs' figures)."""
        return sum(len(family.samples) for family in self.registry.collect())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
