"""Heartbeat: the worker's state in Redis with a TTL, so a dead worker disappears by itself."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from mesh.models import WorkerState

if TYPE_CHECKING:
    from .worker import MeshWorker

# between heartbeats, the worker's watch for requests that reach a model just evicted
ORPHAN_FAST_CHECK_S = 0.1

log = logging.getLogger("mesh.worker.heartbeat")


class Heartbeat(threading.Thread):
    def __init__(self, host: MeshWorker) -> None:
        super().__init__(name="mesh-heartbeat", daemon=True)
        self.host = host
        self.interval = host.settings.heartbeat_interval_s
        self.ttl = max(host.settings.heartbeat_ttl_s, 2 * self.interval)
        self._stop_requested = threading.Event()
        self._last = (time.monotonic(), 0)
        self._last_models: dict[str, int] = {}

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        adopted = False
        while not self._stop_requested.is_set():
            try:
                self.beat()
                if not adopted:
                    self.host.adopt_orphans()
                    adopted = True
                self.host.maintenance()
            except Exception as exc:  # Redis away: keep trying, the TTL tells the others
                log.warning("heartbeat failed: %s", exc)
            until = time.monotonic() + self.interval
            while not self._stop_requested.wait(min(ORPHAN_FAST_CHECK_S, max(0.0, until - time.monotonic()))):
                if time.monotonic() >= until:
                    break
                try:
                    self.host.watch_fresh_orphans()
                except Exception as exc:
                    log.warning("orphan watch failed: %s", exc)

    def state(self) -> WorkerState:
        h = self.host
        models, loading, used = h.manager.snapshot()
        h.metrics.used_bytes.set(used)
        h.metrics.models_loaded.set(len(models))
        stats = h.inference.stats
        now_m = time.monotonic()
        last_t, last_n = self._last
        elapsed = now_m - last_t
        rate = (stats.requests - last_n) / elapsed if elapsed > 0 else 0.0
        self._last = (now_m, stats.requests)
        totals = stats.model_totals()
        for m in models:
            m.requests_total = totals.get(m.model_id, 0)
            done = m.requests_total - self._last_models.get(m.model_id, m.requests_total)
            m.request_rate = round(done / elapsed, 3) if elapsed > 0 else 0.0
        self._last_models = totals
        return WorkerState(
            name=h.name,
            host=h.host,
            pid=h.pid,
            capacity_bytes=h.settings.worker_capacity_bytes,
            used_bytes=used,
            models=models,
            loading=loading,
            shutting_down=h.shutting_down,
            started_at=h.started_at,
            updated_at=time.time(),
            requests_total=stats.requests,
            batches_total=stats.batches,
            failures_total=stats.failures,
            request_rate=round(rate, 3),
        )

    def beat(self) -> None:
        self.host.store.write_heartbeat(self.state(), self.ttl)
