"""Prometheus metrics of one worker, modelled on Triton's set
(triton-inference-server/server docs/user_guide/metrics.md).

Served on MESH_METRICS_PORT (0: off) by prometheus-client's own HTTP server thread, from a
registry of this worker's own, so several workers in one process (tests) never collide.
Labels are the concrete model id and a small closed set of outcomes: cardinality is the
number of models a worker serves.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("mesh.worker.metrics")

# seconds: from 100 us (a batch of a small model) to 60 s (a cold load under load)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def outcome_of(error: BaseException | None) -> str:
    """success, or the failure reason: the error's class in snake case (invalid_input, ...)."""
    if error is None:
        return "success"
    name = type(error).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class WorkerMetrics:
    def __init__(self, worker: str, port: int = 0) -> None:
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
        self.loads = Counter("mesh_model_loads", "Model loads by outcome (success, failed)",
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
        self.capacity_bytes = Gauge("mesh_worker_capacity_bytes", "Bytes of models this worker may hold", registry=r)
        self.used_bytes = Gauge("mesh_worker_used_bytes", "Bytes of loaded (and loading) models", registry=r)
        self.models_loaded = Gauge("mesh_models_loaded", "Models loaded on this worker", registry=r)
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
        self.port = port
        self._server = None
        if port:
            try:
                self._server, _ = start_http_server(port, addr="0.0.0.0", registry=r)
                log.info("metrics on :%d/metrics", port)
            except OSError as exc:  # a taken port must not stop the worker from serving
                log.error("cannot serve metrics on port %d: %s", port, exc)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
