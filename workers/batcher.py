"""Per-model request buffers and the pull policy that turns them into batches.

The consumer thread appends requests (`add`); the inference thread, whenever it is free,
takes the oldest ready batch (`take`). Pull, never push: requests keep accumulating while a
batch runs, which is what makes batches fill (reference/celery.md §1: a push design gave
batches of 1.1). `select_ready` is the policy, a pure function over plain data.

A buffer is ready when
- it is full (`max_batch_size`), or
- its oldest request has waited `max_batch_delay_ms`, or
- nothing more is arriving for it (its Redis queue is empty), so a lone request on an idle
  worker pays no batching delay.
Among ready buffers the one whose oldest request is oldest goes first, so one model's flood
cannot starve another model's requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger("mesh.worker.batcher")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_batch_delay_s: float


@dataclass
class Pending:
    """One buffered request: the Celery Request and when it reached this worker."""

    req: Any
    arrived: float = field(default_factory=time.monotonic)


class BufferView(NamedTuple):
    model_id: str
    count: int
    oldest: float  # monotonic arrival of the oldest request
    max_batch_size: int
    max_batch_delay_s: float
    failed: bool


class Choice(NamedTuple):
    model_id: str
    size: int
    reason: str  # full | delay | idle | failed


def select_ready(
    views: Iterable[BufferView], now: float, quiet: set[str]
) -> tuple[Choice | None, float | None]:
    """Pick the batch to run now, or say how long until one is due (None: nothing buffered)."""
    best: tuple[float, Choice] | None = None
    wait: float | None = None
    for v in views:
        if v.count == 0:
            continue
        if v.failed:
            reason = "failed"
        elif v.count >= v.max_batch_size:
            reason = "full"
        elif now - v.oldest >= v.max_batch_delay_s:
            reason = "delay"
        elif v.model_id in quiet:
            reason = "idle"
        else:
            due = v.oldest + v.max_batch_delay_s - now
            wait = due if wait is None else min(wait, due)
            continue
        choice = Choice(v.model_id, min(v.count, v.max_batch_size), reason)
        if best is None or v.oldest < best[0]:
            best = (v.oldest, choice)
    if best is not None:
        return best[1], 0.0
    return None, wait


@dataclass
class Batch:
    model_id: str
    items: list[Pending]
    reason: str
    error: BaseException | None = None  # set for a failed model: answer every item with it


class _Buffer:
    __slots__ = ("model_id", "policy", "items", "error", "opened", "sealed")

    def __init__(self, model_id: str, policy: BatchPolicy) -> None:
        self.model_id = model_id
        self.policy = policy
        self.items: deque[Pending] = deque()
        self.error: BaseException | None = None
        self.opened = time.monotonic()
        self.sealed = False  # being evicted: serve what is buffered, accept nothing new


class Batcher:
    def __init__(self, queue_depths: Callable[[list[str]], dict[str, int]]) -> None:
        # queue_depths(model_ids) -> messages still in Redis per model: the "is more arriving"
        # probe. Called only by the idle inference thread, and only when a buffer changed.
        self._queue_depths = queue_depths
        self._cond = threading.Condition()
        self._buffers: dict[str, _Buffer] = {}
        self._running = True

    # ---------------------------------------------------------------- consumer thread
    def add(self, model_id: str, req: Any) -> bool:
        """Buffer a request; False when this worker does not serve the model (requeue it)."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None or buf.sealed:
                return False
            buf.items.append(Pending(req))
            self._cond.notify_all()
            return True

    # ---------------------------------------------------------------- model manager
    def open(self, model_id: str, policy: BatchPolicy) -> None:
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None:
                self._buffers[model_id] = _Buffer(model_id, policy)
            else:
                buf.policy, buf.error = policy, None

    def seal(self, model_id: str) -> None:
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is not None:
                buf.sealed = True

    def wait_empty(self, model_id: str, timeout: float) -> bool:
        """Wait until the model's buffer is empty (the inference thread took everything)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (b := self._buffers.get(model_id)) or not b.items, timeout
            )

    def close(self, model_id: str) -> list[Pending]:
        """Stop accepting requests for the model; returns what was still buffered."""
        with self._cond:
            buf = self._buffers.pop(model_id, None)
            return list(buf.items) if buf else []

    def fail(self, model_id: str, error: BaseException, policy: BatchPolicy) -> None:
        """Answer everything buffered or arriving for the model with `error` (load failed,
        model unregistered) until the model is closed: nothing waits forever."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None:
                buf = self._buffers[model_id] = _Buffer(model_id, policy)
            buf.error = error
            buf.opened = time.monotonic()
            self._cond.notify_all()

    def failed_models(self) -> dict[str, tuple[float, int]]:
        """model_id -> (monotonic time it entered failed mode, requests buffered)."""
        with self._cond:
            return {
                m: (b.opened, len(b.items)) for m, b in self._buffers.items() if b.error is not None
            }

    def is_open(self, model_id: str) -> bool:
        with self._cond:
            return model_id in self._buffers

    def buffered(self) -> dict[str, int]:
        with self._cond:
            return {m: len(b.items) for m, b in self._buffers.items()}

    def policies(self) -> dict[str, BatchPolicy]:
        with self._cond:
            return {m: b.policy for m, b in self._buffers.items() if b.error is None}

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()

    # ---------------------------------------------------------------- inference thread
    def take(self, timeout: float = 1.0) -> Batch | None:
        """Block until a batch is ready (or `timeout`); called only when the caller is idle."""
        deadline = time.monotonic() + timeout
        quiet: set[str] = set()
        checked: dict[str, int] = {}
        while True:
            with self._cond:
                if not self._running:
                    return None
                now = time.monotonic()
                views = [
                    BufferView(
                        b.model_id,
                        len(b.items),
                        b.items[0].arrived if b.items else now,
                        b.policy.max_batch_size,
                        b.policy.max_batch_delay_s,
                        b.error is not None,
                    )
                    for b in self._buffers.values()
                ]
                counts = {v.model_id: v.count for v in views if v.count}
                # a probe result holds only while the buffer has not changed since
                quiet = {m for m in quiet if checked.get(m) == counts.get(m)}
                choice, wait = select_ready(views, now, quiet)
                if choice is not None:
                    buf = self._buffers[choice.model_id]
                    items = [buf.items.popleft() for _ in range(choice.size)]
                    self._cond.notify_all()  # wait_empty() callers
                    return Batch(choice.model_id, items, choice.reason, buf.error)
                remaining = deadline - now
                if remaining <= 0:
                    return None
                to_probe = [m for m, n in counts.items() if checked.get(m) != n]
                if not to_probe:
                    self._cond.wait(min(remaining, wait) if wait is not None else remaining)
                    continue
            # outside the lock: the consumer thread keeps buffering while we ask Redis
            try:
                depths = self._queue_depths(to_probe)
            except Exception as exc:  # a failed probe only costs the batching delay
                log.warning("queue depth probe failed: %s", exc)
                depths = {}
            for m in to_probe:
                checked[m] = counts[m]
                if depths.get(m, 1) == 0:
                    quiet.add(m)
