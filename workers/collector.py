"""When the worker runs a full garbage collection: when there is something for it to free.

The worker freezes its start-up heap and raises the collector's thresholds (workers/worker.py
`GC_THRESHOLDS`): requests and loads free nearly everything by reference counting, and a full
collection walks every object outside the freeze while holding the interpreter lock. The
cyclic garbage that reaches the old generation comes from failures: the frames and tracebacks
of failed and refused requests inside Celery's and kombu's handling, and what they hold (the
soak's heap grew 60 -> 110-170 MB in 2-3 minutes without full collections: docs/reliability.md,
"Memory"). A full collection every 15 s kept it flat, but stopped the whole worker each time:
90-180 ms on `closedloop zipf`, whose workers hold ~125,000 objects outside the freeze
(modules imported by the first unpickling of each model class, per-model metric series) and,
with no request failing, found nothing to free.

A full collection now runs at a heartbeat (`Collector.maybe_collect`) when:
- requests failed or messages were refused since the last one, and `ERRORS_EVERY_S` passed:
  the 15-s cadence, only while there is garbage to make it worth its pause;
- a model evicted at least `EVICTED_GRACE_S` ago is still alive: only a reference cycle (or a
  leak) holds it, and a model is the memory the worker's byte bound counts. One that a
  collection does not free either is watched without collecting again, and named in the log
  if it is still alive `LEAK_S` after its eviction;
- the process's resident memory grew by `GROWTH_FRACTION` of itself, and by at least
  `GROWTH_MIN_BYTES`, since the last one (garbage from a source not counted above);
- `FULL_EVERY_S` passed since the last one (`ERRORS_EVERY_S` where resident memory cannot be
  read).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .memory import resident_bytes

log = logging.getLogger("mesh.worker.collector")

FULL_EVERY_S = 300.0
ERRORS_EVERY_S = 15.0
GROWTH_FRACTION = 0.25
GROWTH_MIN_BYTES = 64 * 1024**2
# An evicted model may still be referenced for a moment (a snapshot being written, the
# retiring thread's last frame); it is judged at the first heartbeat this long after eviction.
EVICTED_GRACE_S = 1.0
# An evicted model alive this long, a full collection since, is named in the log: a leak.
LEAK_S = 60.0

ERRORS, EVICTED_ALIVE, GREW, INTERVAL = "failures", "evicted model alive", "memory grew", "interval"


def collection_due(*, since_s: float, failures: int, resident: int | None, resident_after_last: int | None,
                   evicted_alive: bool) -> str | None:  # fmt: skip
    """Why a full collection is due now, or None. `since_s`: since the last one; `failures`:
    requests failed and messages refused since; `resident`: the process's resident bytes now,
    `resident_after_last`: right after the last one (None: not known)."""
    if evicted_alive:
        return EVICTED_ALIVE
    if failures and since_s >= ERRORS_EVERY_S:
        return ERRORS
    if resident is None or resident_after_last is None:
        return INTERVAL if since_s >= ERRORS_EVERY_S else None
    if resident - resident_after_last >= max(GROWTH_MIN_BYTES, GROWTH_FRACTION * resident_after_last):
        return GREW
    return INTERVAL if since_s >= FULL_EVERY_S else None


class Collector:
    """Watches evicted models (`evicted`, any thread) and runs the full collections that are due
    (`maybe_collect`, the heartbeat thread)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        failures: Callable[[], int] = lambda: 0,
        resident: Callable[[], int | None] = resident_bytes,
        collect: Callable[[], Any] = gc.collect,
    ) -> None:
        self._clock = clock
        self._failures = failures  # requests failed and messages refused so far (a running count)
        self._resident = resident
        self._collect = collect
        self._lock = threading.Lock()
        # (model id, a weak reference to the model or None when it takes none, evicted at)
        self._evicted: list[tuple[str, weakref.ref | None, float]] = []
        self._suspects: list[tuple[str, weakref.ref | None, float]] = []  # heartbeat thread only
        self._last_at = clock()
        self._resident_after = resident()
        self._failures_after = 0

    def evicted(self, model_id: str, model: Any) -> None:
        """`model` was unloaded and dropped by the worker: it should be freed now."""
        try:
            ref: weakref.ref | None = weakref.ref(model)
        except TypeError:  # an object without weak references: judged alive, collected once
            ref = None
        with self._lock:
            self._evicted.append((model_id, ref, self._clock()))

    def maybe_collect(self) -> str | None:
        """Run a full collection if one is due; its reason, or None."""
        now = self._clock()
        with self._lock:
            young = [e for e in self._evicted if now - e[2] < EVICTED_GRACE_S]
            judged = [e for e in self._evicted if now - e[2] >= EVICTED_GRACE_S]
            self._evicted = young
        alive = [e for e in judged if e[1] is None or e[1]() is not None]
        self._name_leaks(now)
        failures = self._failures()
        reason = collection_due(since_s=now - self._last_at, failures=failures - self._failures_after,
                                resident=self._resident(), resident_after_last=self._resident_after,
                                evicted_alive=bool(alive))  # fmt: skip
        if reason is None:
            return None
        started = time.perf_counter()
        self._collect()
        log.debug("full collection (%s): %.1f ms", reason, (time.perf_counter() - started) * 1e3)
        self._last_at = self._clock()
        self._resident_after = self._resident()
        self._failures_after = failures
        # still alive after a collection: held by something (a snapshot being written, a
        # leak); watched without collecting again, and named if it outlives LEAK_S
        self._suspects += [e for e in alive if e[1] is not None and e[1]() is not None]
        return reason

    def _name_leaks(self, now: float) -> None:
        kept = []
        for model_id, ref, evicted_at in self._suspects:
            if ref is None or ref() is None:
                continue
            if now - evicted_at < LEAK_S:
                kept.append((model_id, ref, evicted_at))
                continue
            log.warning("the model %s, evicted %.0f s ago, is still referenced (after a full "
                        "collection): its memory is not freed", model_id, now - evicted_at)  # fmt: skip
        self._suspects = kept


__all__ = ["Collector", "collection_due", "ERRORS", "EVICTED_ALIVE", "GREW", "INTERVAL"]
