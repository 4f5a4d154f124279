"""Heartbeat: the worker's state in Redis with a TTL, so a dead worker disappears by itself."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mesh.models import WorkerState

from .threadnames import name_os_thread

if TYPE_CHECKING:
    from mesh.store.state import StateStore

    from .inference import Stats
    from .manager import ModelManager
    from .metrics import WorkerMetrics

# between heartbeats, the worker's watch for requests that reach a model just evicted: every
# request it finds waited half of this on average before a load was even asked for (at 0.1 s,
# 50 ms of the 90-100 ms such requests took in closedloop zipf); one script call each time
# (StateStore.queued), a fraction of a millisecond
ORPHAN_FAST_CHECK_S = 0.025

log = logging.getLogger("mesh.worker.heartbeat")


@dataclass(frozen=True)
class WorkerIdentity:
    """What a heartbeat says about the process, fixed for its life."""

    name: str  # Celery node name (w1@host): the worker's id in Redis
    hostname: str  # the machine's
    pid: int
    started_at: float
    capacity_bytes: int
    labels: dict[str, str] = field(default_factory=dict)  # MESH_WORKER_LABELS


class Heartbeat(threading.Thread):
    """Writes the worker's state every `interval_s`, then runs the `after_beat` duties; between
    beats, every ORPHAN_FAST_CHECK_S, the `between_beats` ones. A duty that raises is logged
    and the rest of that round skipped; the next round runs them all again."""

    def __init__(
        self,
        store: StateStore,
        identity: WorkerIdentity,
        manager: ModelManager,
        stats: Stats,
        metrics: WorkerMetrics,
        shutting_down: Callable[[], bool],
        interval_s: float,
        ttl_s: float,
        after_beat: Sequence[Callable[[], None]] = (),
        between_beats: Sequence[Callable[[], None]] = (),
    ) -> None:
        super().__init__(name="mesh-heartbeat", daemon=True)
        self.store = store
        self.identity = identity
        self.manager = manager
        self.stats = stats
        self.metrics = metrics
        self.shutting_down = shutting_down
        self.interval = interval_s
        self.ttl = max(ttl_s, 2 * interval_s)
        self.after_beat = list(after_beat)
        self.between_beats = list(between_beats)
        self._stop_requested = threading.Event()
        self._last = (time.monotonic(), 0)
        self._last_models: dict[str, int] = {}

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        name_os_thread()
        while not self._stop_requested.is_set():
            try:
                self.beat()
                for duty in self.after_beat:
                    duty()
            except Exception as exc:  # Redis away: keep trying, the TTL tells the others
                log.warning("heartbeat failed: %s", exc)
            until = time.monotonic() + self.interval
            while not self._stop_requested.wait(min(ORPHAN_FAST_CHECK_S, max(0.0, until - time.monotonic()))):
                if time.monotonic() >= until:
                    break
                try:
                    for duty in self.between_beats:
                        duty()
                except Exception as exc:
                    log.warning("orphan watch failed: %s", exc)

    def state(self) -> WorkerState:
        models, loading, used = self.manager.snapshot()
        self.metrics.used_bytes.set(used)
        self.metrics.models_loaded.set(len(models))
        stats, me = self.stats, self.identity
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
            name=me.name,
            host=me.hostname,
            pid=me.pid,
            capacity_bytes=me.capacity_bytes,
            used_bytes=used,
            models=models,
            loading=loading,
            shutting_down=self.shutting_down(),
            started_at=me.started_at,
            updated_at=time.time(),
            requests_total=stats.requests,
            batches_total=stats.batches,
            failures_total=stats.failures,
            request_rate=round(rate, 3),
            labels=me.labels,
        )

    def beat(self) -> None:
        self.store.write_heartbeat(self.state(), self.ttl)
