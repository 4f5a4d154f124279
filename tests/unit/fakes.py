"""In-memory implementations of the worker's ports (workers/ports.py) and a stand-in for a
Celery request, so the worker's parts run in the test process: no worker, no consumer thread.

`call_soon` runs its callback at once on the calling thread; that is the ordering the real
port guarantees (FIFO), without the thread hop. Everything a part asks of the consumer is
recorded, so tests check what was asked and in which order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import MeshError


class FakeConsumer:
    """`ConsumerPort` in memory; `log` records every call in order."""

    def __init__(self, batcher: Any = None, dispatcher: Any = None) -> None:
        self.log: list[tuple] = []
        self.consuming: set[str] = set()
        self.requeued: list[Any] = []
        self.batcher = batcher
        self.dispatcher = dispatcher
        self.lock = threading.Lock()

    def call_soon(self, fn, *args) -> None:
        fn(*args)

    def consume(self, model_id: str, wake: bool = True) -> None:
        with self.lock:
            self.log.append(("consume", model_id))
            self.consuming.add(model_id)

    def stop_consuming(self, model_id: str) -> None:
        with self.lock:
            self.log.append(("stop_consuming", model_id))
            self.consuming.discard(model_id)

    def requeue(self, items, now: bool = False, wait_s: float = 0.0) -> None:
        with self.lock:
            self.log.append(("requeue", [p.req.id for p in items]))
            self.requeued.extend(items)

    admitted_bytes = 0

    def admitted(self, nbytes: int) -> None:
        """The byte bound's intake hook (CeleryConsumer.admitted): not recorded."""
        self.admitted_bytes += nbytes

    def released(self, buffered: int) -> None:
        pass

    def update_prefetch(self) -> None:
        with self.lock:
            self.log.append(("update_prefetch",))

    def event_dispatcher(self) -> Any:
        return self.dispatcher


class FakeEvents:
    """`CopyEvents` in memory: what the manager reported, in order."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.changed = threading.Condition()

    def _add(self, *event: Any) -> None:
        with self.changed:
            self.log.append(event)
            self.changed.notify_all()

    def copy_loaded(self, model_id: str) -> None:
        self._add("loaded", model_id)

    def load_failed(self, model_id: str, message: str) -> None:
        self._add("load_failed", model_id, message)

    def load_refused(self, model_id: str, reason: str) -> None:
        self._add("load_refused", model_id, reason)

    def copy_unloaded(self, model_id: str, unregistered: bool) -> None:
        self._add("unloaded", model_id, unregistered)

    def fail_model(self, model_id: str, error: MeshError) -> None:
        self._add("fail_model", model_id, error)

    def count(self, event: tuple) -> int:
        return sum(1 for e in self.log if e[: len(event)] == event)

    def no_more_than(self, event: tuple, n: int, within: float) -> None:
        """Fail as soon as `event` is reported more than `n` times; pass after `within` s.
        For what must not happen: nothing positive marks the moment it no longer can."""
        deadline = time.monotonic() + within
        with self.changed:
            while self.count(event) <= n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.changed.wait(left)
        raise AssertionError(f"{event} reported more than {n} time(s): {self.log}")

    def wait_for(self, event: tuple, timeout: float = 10.0) -> None:
        """Until `event` (a prefix of a logged event) has been reported."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(e[: len(event)] == event for e in self.log):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{event} not reported; events: {self.log}")
                self.changed.wait(left)


@dataclass(eq=False)
class FakeMessage:
    """kombu's Message, as far as the results pipeline's ack reads it. Its channel is no
    Redis channel, so acks go through `ack()`; `on_ack` runs at that moment (what must
    already be true when a message is acked)."""

    delivery_tag: str
    acknowledged: bool = False
    on_ack: Any = None
    channel: Any = field(default_factory=object)
    body: bytes | None = None

    def ack(self) -> None:
        if self.on_ack is not None:
            self.on_ack(self)
        self.acknowledged = True


@dataclass(eq=False)  # hashable like Celery's: its worker state keeps requests in sets
class FakeRequest:
    """A Celery worker Request, as far as the inference loop reads and calls it."""

    id: str
    kwargs: dict
    routing_key: str = ""
    expires: Any = None
    events: list[tuple] = field(default_factory=list)
    _request_dict: dict = field(default_factory=dict)
    acknowledged: bool = False
    reply_to: str | None = None  # the producer's reply list (mesh/broker/replies.py)

    def __post_init__(self) -> None:
        self._message = FakeMessage(self.id)
        self.delivery_info = {"routing_key": self.routing_key}

    def on_accepted(self, pid: int, started: float) -> None:
        self.events.append(("accepted",))

    def send_event(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))

    def revoked(self) -> bool:
        self.events.append(("revoked",))
        return True

    def reject(self, requeue: bool = False) -> None:
        self.events.append(("rejected", requeue))
