"""Per-model request buffers and the pull policy that turns them into batches.

The consumer thread appends requests (`add`); the inference thread, whenever it is free,
takes the oldest ready batch (`take`). Pull, never push: requests keep accumulating while a
batch runs, which is what makes batches fill (a push design, flushing on a timer as
celery-batches does in clokep/celery-batches celery_batches/__init__.py, gave batches of 1.1;
docs/architecture.md, "The request path"). `select_ready` is the policy, a pure function over plain data.

Sizes count *items*: a request is one item, a client micro-batch (`infer_many`) is as many
items as it carries. A buffer is ready when
- it holds `max_batch_size` items (or the largest `preferred_batch_sizes` entry), or
- its oldest request has waited `max_batch_delay_ms`, or
- nothing more is arriving for it (its Redis queue is empty), so a lone request on an idle
  worker pays no batching delay.
Among ready buffers the one whose oldest request is oldest goes first, so one model's flood
cannot starve another model's requests. Inside a buffer, high-priority requests go first.
A model the worker is loading again has a *held* buffer: it takes requests in but is never
ready until the model manager opens it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger("mesh.worker.batcher")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_batch_delay_s: float
    preferred_batch_sizes: tuple[int, ...] = ()
    predict_timeout_s: float = 0.0  # the inference watchdog's limit per predict call (0: none)


@dataclass
class Pending:
    """One buffered message: the Celery Request, its item count, when it arrived here, and its
    size (its JSON body's bytes: what MESH_MAX_BUFFERED_BYTES bounds)."""

    req: Any
    items: int = 1
    high: bool = False
    arrived: float = field(default_factory=time.monotonic)
    nbytes: int = 0


class BufferView(NamedTuple):
    model_id: str
    count: int  # items buffered
    oldest: float  # monotonic arrival of the oldest request
    max_batch_size: int
    max_batch_delay_s: float
    failed: bool
    preferred: tuple[int, ...] = ()


class Choice(NamedTuple):
    model_id: str
    size: int  # items to take
    reason: str  # full | delay | idle | failed


def batch_size(count: int, max_batch_size: int, preferred: Sequence[int]) -> int:
    """Items to take from `count` buffered: the largest preferred size that fits, else all
    up to max_batch_size (Triton's rule for preferred batch sizes)."""
    cap = min(count, max_batch_size)
    fitting = [p for p in preferred if p <= cap]
    return max(fitting) if fitting else cap


def select_ready(
    views: Iterable[BufferView], now: float, quiet: set[str]
) -> tuple[Choice | None, float | None]:
    """Pick the batch to run now, or say how long until one is due (None: nothing buffered)."""
    best: tuple[float, Choice] | None = None
    wait: float | None = None
    for v in views:
        if v.count == 0:
            continue
        full_at = min(v.max_batch_size, max(v.preferred)) if v.preferred else v.max_batch_size
        if v.failed:
            reason = "failed"
        elif v.count >= full_at:
            reason = "full"
        elif now - v.oldest >= v.max_batch_delay_s:
            reason = "delay"
        elif v.model_id in quiet:
            reason = "idle"
        else:
            due = v.oldest + v.max_batch_delay_s - now
            wait = due if wait is None else min(wait, due)
            continue
        size = v.count if v.failed else batch_size(v.count, v.max_batch_size, v.preferred)
        choice = Choice(v.model_id, size, reason)
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


class _Lanes:
    """Two FIFO lanes (high, normal priority) with an item count and a byte count."""

    __slots__ = ("high", "normal", "units", "nbytes")

    def __init__(self) -> None:
        self.high: deque[Pending] = deque()
        self.normal: deque[Pending] = deque()
        self.units = 0
        self.nbytes = 0

    def append(self, p: Pending) -> None:
        (self.high if p.high else self.normal).append(p)
        self.units += p.items
        self.nbytes += p.nbytes

    def oldest(self, default: float) -> float:
        heads = [lane[0].arrived for lane in (self.high, self.normal) if lane]
        return min(heads) if heads else default

    def take(self, units: int) -> list[Pending]:
        """At least one message, then more while they fit in `units` (high lane first)."""
        out: list[Pending] = []
        taken = nbytes = 0
        for lane in (self.high, self.normal):
            while lane and (not out or taken + lane[0].items <= units):
                p = lane.popleft()
                out.append(p)
                taken += p.items
                nbytes += p.nbytes
        self.units -= taken
        self.nbytes -= nbytes
        return out

    def drain(self) -> list[Pending]:
        out = list(self.high) + list(self.normal)
        self.high.clear()
        self.normal.clear()
        self.units = self.nbytes = 0
        return out

    def __len__(self) -> int:
        return len(self.high) + len(self.normal)


class _Buffer:
    __slots__ = ("model_id", "policy", "lanes", "error", "opened", "sealed", "held")

    def __init__(self, model_id: str, policy: BatchPolicy, held: bool = False) -> None:
        self.model_id = model_id
        self.policy = policy
        self.lanes = _Lanes()
        self.error: BaseException | None = None
        self.opened = time.monotonic()
        self.sealed = False  # being evicted: serve what is buffered, accept nothing new
        self.held = held  # its model is still loading: accept, but batch nothing yet


class Batcher:
    def __init__(self, queue_depths: Callable[[list[str]], dict[str, int]],
                 on_release: Callable[[int], None] | None = None) -> None:  # fmt: skip
        # queue_depths(model_ids) -> messages still in Redis per model: the "is more arriving"
        # probe. Called only by the idle inference thread, and only when a buffer changed.
        self._queue_depths = queue_depths
        # on_release(bytes still buffered): requests left the buffers (taken, or handed back);
        # called outside the lock, from the thread that took them
        self._on_release = on_release
        self._cond = threading.Condition()
        self._buffers: dict[str, _Buffer] = {}
        self._running = True
        self._bytes = 0  # bytes of every buffered request (Pending.nbytes)
        self._count = 0  # buffered requests (messages)

    # ---------------------------------------------------------------- consumer thread
    def add(self, model_id: str, req: Any, items: int = 1, high: bool = False, nbytes: int = 0) -> bool:
        """Buffer a request; False when this worker does not serve the model (requeue it)."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None or buf.sealed:
                return False
            buf.lanes.append(Pending(req, items, high, nbytes=nbytes))
            self._bytes += nbytes
            self._count += 1
            self._cond.notify_all()
            return True

    def buffered_bytes(self) -> int:
        """Bytes of the requests buffered now (their JSON bodies)."""
        return self._bytes

    def buffered_messages(self) -> int:
        """Requests (messages) buffered now."""
        return self._count

    def _released(self, nbytes: int, messages: int) -> None:
        """Lock held: `messages` requests of `nbytes` left the buffers."""
        self._bytes -= nbytes
        self._count -= messages

    def _notify_release(self, nbytes: int) -> None:
        if nbytes and self._on_release is not None:
            try:
                self._on_release(self._bytes)
            except Exception:  # only the intake's pace depends on it
                log.exception("on_release callback failed")

    # ---------------------------------------------------------------- model manager
    def hold(self, model_id: str, policy: BatchPolicy) -> None:
        """Accept the model's requests while it loads (again), batching none of them until
        `open`: its queue is consumed from the start of the reload, so the requests that asked
        for it are in hand the moment it is installed. A buffer that exists already only takes
        the policy (a held one) or stays as it is (serving, or failed)."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None:
                self._buffers[model_id] = _Buffer(model_id, policy, held=True)
            elif buf.held:
                buf.policy = policy

    def release_held(self, model_id: str) -> list[Pending] | None:
        """Close a held buffer (its load did not happen); returns what it took in, or None when
        the buffer is not held (serving, failed, or gone): then it stays as it is."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None or not buf.held:
                return None
            del self._buffers[model_id]
            nbytes = buf.lanes.nbytes
            out = buf.lanes.drain()
            self._released(nbytes, len(out))
        self._notify_release(nbytes)
        return out

    def open(self, model_id: str, policy: BatchPolicy) -> None:
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None:
                self._buffers[model_id] = _Buffer(model_id, policy)
            else:
                buf.policy, buf.error, buf.sealed, buf.held = policy, None, False, False
                self._cond.notify_all()  # what it held while loading is ready now

    def seal(self, model_id: str) -> None:
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is not None:
                buf.sealed = True

    def wait_empty(self, model_id: str, timeout: float) -> bool:
        """Wait until the model's buffer is empty (the inference thread took everything)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (b := self._buffers.get(model_id)) or not b.lanes, timeout
            )

    def close(self, model_id: str) -> list[Pending]:
        """Stop accepting requests for the model; returns what was still buffered."""
        with self._cond:
            buf = self._buffers.pop(model_id, None)
            if buf is None:
                return []
            nbytes = buf.lanes.nbytes
            out = buf.lanes.drain()
            self._released(nbytes, len(out))
        self._notify_release(nbytes)
        return out

    def fail(self, model_id: str, error: BaseException, policy: BatchPolicy) -> None:
        """Answer everything buffered or arriving for the model with `error` (load failed,
        model unregistered) until the model is closed: nothing waits forever."""
        with self._cond:
            buf = self._buffers.get(model_id)
            if buf is None:
                buf = self._buffers[model_id] = _Buffer(model_id, policy)
            buf.error = error
            buf.sealed = buf.held = False
            buf.opened = time.monotonic()
            self._cond.notify_all()

    def failed_models(self) -> dict[str, tuple[float, int]]:
        """model_id -> (monotonic time it entered failed mode, requests buffered)."""
        with self._cond:
            return {
                m: (b.opened, len(b.lanes)) for m, b in self._buffers.items() if b.error is not None
            }

    def is_open(self, model_id: str) -> bool:
        with self._cond:
            return model_id in self._buffers

    def buffered(self) -> dict[str, int]:
        with self._cond:
            return {m: len(b.lanes) for m, b in self._buffers.items()}

    def waiting_since(self) -> dict[str, float]:
        """model id -> monotonic arrival of its oldest buffered request (models with some)."""
        with self._cond:
            return {m: b.lanes.oldest(0.0) for m, b in self._buffers.items() if len(b.lanes)}

    def empty(self) -> bool:
        """Nothing buffered for any model."""
        with self._cond:
            return not any(len(b.lanes) for b in self._buffers.values())

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
                        b.lanes.units,
                        b.lanes.oldest(now),
                        b.policy.max_batch_size,
                        b.policy.max_batch_delay_s,
                        b.error is not None,
                        b.policy.preferred_batch_sizes,
                    )
                    for b in self._buffers.values()
                    # an empty buffer has nothing to choose (`select_ready` passes over it):
                    # under churn most of a worker's twenty-odd buffers are empty at any time
                    if b.lanes.units and not b.held
                ]
                counts = {v.model_id: v.count for v in views if v.count}
                # a probe result holds only while the buffer has not changed since
                quiet = {m for m in quiet if checked.get(m) == counts.get(m)}
                choice, wait = select_ready(views, now, quiet)
                if choice is not None:
                    buf = self._buffers[choice.model_id]
                    before = buf.lanes.nbytes
                    items = buf.lanes.take(choice.size)
                    nbytes = before - buf.lanes.nbytes
                    self._released(nbytes, len(items))
                    self._cond.notify_all()  # wait_empty() callers
                    batch = Batch(choice.model_id, items, choice.reason, buf.error)
                    break
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
        self._notify_release(nbytes)
        return batch
