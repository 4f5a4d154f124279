"""`mesh exporter`: one cluster-level Prometheus endpoint per mesh, the signal to autoscale
workers on (docs/operations.md, "Autoscaling signals").

Per-model series only for the MESH_SIGNALS_TOP_N models with the most pending requests (the
`model` label's values are bounded whatever the number of registered models), per-pool series
for the MESH_SIGNALS_TOP_POOLS worker pools with the most demand (`pool` label; the rest summed
as `pool="other"`), and cluster-wide aggregates of everything (mesh/policy/signals.py). Each scrape reads Redis at
most once per MESH_SIGNALS_MIN_INTERVAL_S (several Prometheus replicas or a KEDA operator
scraping at once share a reading), through a bounded number of round trips
(mesh/store/signals.py). The endpoint has no authentication: it binds MESH_EXPORTER_ADDR,
loopback by default, like the workers' metrics (docs/security.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.policy.signals import Signals, summarize
from mesh.protocol.messages import PRIORITY_STEPS
from mesh.settings import MeshSettings
from mesh.store.context import StoreContext
from mesh.store.signals import SignalReader

log = logging.getLogger("mesh.exporter")

# (name, help, Signals field) of the cluster-wide gauges
_CLUSTER = [
    ("pending_requests", "Requests not answered yet, every model: queued in Redis, buffered or running in workers", "pending"),
    ("queued_requests", "Requests waiting in the models' Redis queues", "queued"),
    ("buffered_requests", "Requests held by workers (buffered or in a running batch), from their heartbeats", "buffered"),
    ("oldest_pending_age_seconds", "Age of the oldest pending request of any model", "oldest_pending_age_s"),
    ("models_registered", "Registered models", "models_registered"),
    ("models_pending", "Models with at least one pending request", "models_pending"),
    ("models_pending_without_copy", "Models with pending requests and no loaded copy on a live worker", "models_pending_without_copy"),
    ("models_loaded", "Models with at least one loaded copy", "models_loaded"),
    ("copies_loaded", "Loaded copies, all models", "copies_loaded"),
    ("workers", "Live workers (heartbeat present)", "workers"),
    ("workers_shutting_down", "Live workers that are shutting down", "workers_shutting_down"),
    ("capacity_bytes", "Bytes of models the live workers not shutting down may hold", "capacity_bytes"),
    ("used_bytes", "Bytes of models loaded or loading on live workers", "used_bytes"),
    ("demand_bytes", "Bytes of the models wanted in memory (pending or loaded)", "demand_bytes"),
    ("demand_unknown_models", "Wanted models whose size is not known yet (not in demand_bytes)", "demand_unknown_models"),
]  # fmt: skip

# (name, help, PoolSignal field) of the per-pool gauges (label `pool`: the labels its models
# require, `default` for the models that require none, `other` for the pools past the top ones)
_POOL = [
    ("workers", "Live workers carrying the pool's labels, not shutting down", "workers"),
    ("capacity_bytes", "Bytes of models the pool's live workers not shutting down may hold", "capacity_bytes"),
    ("used_bytes", "Bytes of models loaded or loading on the live workers carrying the pool's labels", "used_bytes"),
    ("demand_bytes", "Bytes of the pool's models wanted in memory (pending or loaded)", "demand_bytes"),
    ("demand_unknown_models", "Wanted models of the pool whose size is not known yet (not in demand_bytes)", "demand_unknown_models"),
    ("pending_requests", "Requests of the pool's models not answered yet (queued, buffered or running)", "pending"),
    ("models_pending", "Models of the pool with at least one pending request", "models_pending"),
    ("models_pending_without_copy", "Models of the pool with pending requests and no loaded copy on a live worker", "models_pending_without_copy"),
    ("models_loaded", "Models of the pool with at least one loaded copy", "models_loaded"),
]  # fmt: skip


class SignalSource:
    """Readings of one mesh's signals, at most one Redis read per `min_interval_s`."""

    def __init__(
        self, ctx: StoreContext, *, top_n: int, min_interval_s: float = 1.0, top_pools: int | None = None
    ) -> None:
        self.ctx, self.top_n, self.min_interval_s = ctx, top_n, min_interval_s
        self.top_pools = MeshSettings.model_fields["signals_top_pools"].default if top_pools is None else top_pools
        self.reader = SignalReader(ctx.store, PRIORITY_STEPS)
        self._lock = threading.Lock()
        self._last: tuple[float, Signals, float] | None = None  # (monotonic, reading, read seconds)

    def read(self) -> tuple[Signals, float]:
        """The latest reading and how long it took; raises what Redis raised."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.min_interval_s:
                return self._last[1], self._last[2]
            started = time.monotonic()
            inputs = self.reader.read()
            signals = summarize(
                queued=inputs.queued, oldest_sent=inputs.oldest_sent, workers=inputs.workers,
                sizes=inputs.sizes, registered=inputs.registered, now=time.time(), top_n=self.top_n,
                required=inputs.required, top_pools=self.top_pools,
            )  # fmt: skip
            took = time.monotonic() - started
            self._last = (time.monotonic(), signals, took)
            return signals, took


class SignalCollector(Collector):
    """Prometheus collector: one reading per scrape (SignalSource caches)."""

    def __init__(self, source: SignalSource, mesh: str) -> None:
        self.source, self.mesh = source, mesh

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("mesh_signals_up", "1 if the last reading of the mesh's Redis succeeded", labels=["mesh"])
        try:
            signals, took = self.source.read()
        except Exception as exc:  # Redis away (a failover): say so, keep serving
            log.warning("cannot read the mesh's signals: %s: %s", type(exc).__name__, str(exc)[:200])
            up.add_metric([self.mesh], 0)
            yield up
            return
        up.add_metric([self.mesh], 1)
        yield up
        yield from families(signals, self.mesh, took)


def families(signals: Signals, mesh: str, took: float = 0.0) -> list[GaugeMetricFamily]:
    """The metric families of one reading."""
    out: list[GaugeMetricFamily] = []
    for name, help_text, field in _CLUSTER:
        g = GaugeMetricFamily(f"mesh_cluster_{name}", help_text, labels=["mesh"])
        g.add_metric([mesh], float(getattr(signals, field)))
        out.append(g)
    other = GaugeMetricFamily(
        "mesh_cluster_other_pending_requests",
        "Pending requests of the models not among the top N (no per-model series)", labels=["mesh"],
    )  # fmt: skip
    other.add_metric([mesh], float(signals.pending - sum(m.pending for m in signals.models)))
    out.append(other)
    per_model = [
        ("mesh_model_pending_requests", "Pending requests of a top-N model (queued + held by workers)", "pending"),
        ("mesh_model_queued_requests", "Requests of a top-N model waiting in its Redis queue", "queued"),
        ("mesh_model_oldest_pending_age_seconds", "Age of a top-N model's oldest pending request", "oldest_pending_age_s"),
        ("mesh_model_copies", "Loaded copies of a top-N model on live workers", "copies"),
    ]  # fmt: skip
    for name, help_text, field in per_model:
        g = GaugeMetricFamily(name, help_text, labels=["mesh", "model"])
        for m in signals.models:
            g.add_metric([mesh, m.model_id], float(getattr(m, field)))
        out.append(g)
    for name, help_text, field in _POOL:
        g = GaugeMetricFamily(f"mesh_pool_{name}", help_text, labels=["mesh", "pool"])
        for p in signals.pools:
            g.add_metric([mesh, p.pool], float(getattr(p, field)))
        out.append(g)
    top = GaugeMetricFamily("mesh_signals_top_n", "How many models get per-model series (MESH_SIGNALS_TOP_N)", labels=["mesh"])
    top.add_metric([mesh], float(signals.top_n))
    top_pools = GaugeMetricFamily(
        "mesh_signals_top_pools", "How many worker pools get their own series (MESH_SIGNALS_TOP_POOLS)", labels=["mesh"]
    )  # fmt: skip
    top_pools.add_metric([mesh], float(signals.top_pools))
    read = GaugeMetricFamily("mesh_signals_read_seconds", "How long the last reading of Redis took", labels=["mesh"])
    read.add_metric([mesh], took)
    return [*out, top, top_pools, read]


def serve(
    ctx: StoreContext, *, addr: str, port: int, top_n: int, min_interval_s: float, top_pools: int | None = None
) -> tuple[Any, int]:
    """Start serving /metrics in a daemon thread; returns (server, the port bound)."""
    registry = CollectorRegistry(auto_describe=False)
    source = SignalSource(ctx, top_n=top_n, min_interval_s=min_interval_s, top_pools=top_pools)
    registry.register(SignalCollector(source, ctx.keys.prefix))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_address[1]


__all__ = ["SignalCollector", "SignalSource", "families", "serve"]
