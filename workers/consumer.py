"""`ConsumerPort` over a real Celery consumer: queues, QoS and requeues, on the consumer thread.

kombu channels belong to the consumer thread, so everything here goes through `call_soon`;
this is the only module of the worker that touches the consumer's queues, QoS and requeues
(what the other threads need: the strategies and the bootsteps use the consumer only to take
messages in and to set the worker up and down).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.worker import state as worker_state

from mesh.broker.transport import ack_many
from mesh.models import Command

if TYPE_CHECKING:
    from mesh.protocol.keys import Keys

    from .batcher import Batcher, Pending
    from .metrics import WorkerMetrics

log = logging.getLogger("mesh.worker.consumer")

EVENT_BUFFER_LIMIT = 256  # buffered events per flush (Celery: 24)
# Buffered task events are published at most this long after the first of them (Celery: on
# the next loop turn). One request at a time, every turn held one request's event, so each
# request paid three PUBLISHes of its own: 27 % of a worker's samples (py-spy, scripts/bench
# closedloop svc1; docs/benchmarks.md, "Closed-loop clients"). At 10 ms a worker answering
# 200-400 requests a second still published a flush (two messages: the task group and the
# mesh group) every 2-4 requests, 5 % of its interpreter time at closedloop zipf; at 50 ms,
# every 10-20. Flower sees events up to 50 ms later.
EVENT_FLUSH_DELAY_S = 0.05
EVENT_FLUSH_STALE_S = 1.0
# Commands (acked at once: they are idempotent) are acked together at most this long after
# the first of them: each ack was a transaction of its own on the consumer thread, one per
# load at closedloop zipf (~80 a second per worker), 3 % of a worker's interpreter time.
COMMAND_ACK_DELAY_S = 0.05
# The byte bound's estimate of the next message's size decays by this factor with every
# message taken (and jumps to any larger one): after a burst of large requests, small ones get
# their full prefetch back within a few dozen messages.
SIZE_DECAY = 0.9


class CeleryConsumer:
    """The worker's `ConsumerPort` (workers/ports.py).

    `send_command(worker, cmd)` sends a command to a worker's private queue: `consume` rings
    our own with a no-op one. `batcher` gives the served models' batch policies, which the
    prefetch budget is computed from.
    """

    def __init__(
        self,
        consumer: Any,
        keys: Keys,
        name: str,
        batcher: Batcher,
        metrics: WorkerMetrics,
        send_command: Callable[[str, Command], None],
        prefetch_floor: int,
        max_buffered_bytes: int = 0,
        max_message_bytes: int = 0,
    ) -> None:
        self.consumer = consumer
        self.keys = keys
        self.name = name
        self.batcher = batcher
        self.metrics = metrics
        self.send_command = send_command
        self.prefetch_floor = prefetch_floor
        # The byte bound (MESH_MAX_BUFFERED_BYTES; 0: none). Messages are sized only once
        # taken, so the prefetch is lowered ahead: to the messages buffered plus as many of
        # the estimated size as still fit (`_apply_qos`). The estimate starts at the largest
        # message the worker accepts.
        self.max_buffered_bytes = max_buffered_bytes
        self._size_estimate = float(max(1, max_message_bytes))
        self._budget = prefetch_floor  # the prefetch the batch sizes ask for (update_prefetch)
        self._limited = False  # the byte bound holds the prefetch below the budget now
        self.admitted_bytes = 0  # total bytes of the requests buffered so far (the trim's pace)
        self._peak = 0
        self._soon: deque = deque()  # consumer-thread callbacks, in order (call_soon)
        self._soon_lock = threading.Lock()
        self._declared: set[str] = set()  # model queues this worker declared (consumer thread)
        self._flush_scheduled_at = -1.0  # monotonic time of the pending event flush (consumer thread)
        self._acks: list = []  # command messages to ack (`ack_soon`; consumer thread)
        self._acks_scheduled_at = -1.0

    def event_dispatcher(self) -> Any:
        """Celery's event dispatcher, set up (once per dispatcher: a reconnect makes a new one)
        to buffer `mesh-batch` events with the task events and to flush them together."""
        d = self.consumer.event_dispatcher
        if d is not None and d.on_send_buffered is not None and "mesh" not in d.buffer_group:
            # Celery buffers task events and publishes each group as one `task.multi` message;
            # `mesh-batch` events join that (one `mesh.multi`, not a PUBLISH per batch), and a
            # buffer may hold a whole large batch's events (Celery flushes every 24). Receivers
            # (Flower) take lists as they come.
            d.buffer_group = frozenset(d.buffer_group) | {"mesh"}
            d.buffer_limit = max(d.buffer_limit, EVENT_BUFFER_LIMIT)
            hub = getattr(self.consumer, "hub", None)
            if hub is not None:
                d.on_send_buffered = lambda: self._flush_events_soon(hub, d)
        return d

    def _flush_events_soon(self, hub: Any, dispatcher: Any) -> None:
        """The dispatcher's `on_send_buffered` (consumer thread: events are sent from it). A
        flush scheduled long ago and never run (its timer went with a lost connection) does not
        hold the next one back."""
        now = time.monotonic()
        if now - self._flush_scheduled_at < EVENT_FLUSH_STALE_S:
            return
        self._flush_scheduled_at = now
        hub.call_later(EVENT_FLUSH_DELAY_S, self._flush_events, dispatcher)

    def _flush_events(self, dispatcher: Any) -> None:
        self._flush_scheduled_at = -1.0
        dispatcher.flush()

    def ack_soon(self, message: Any) -> None:
        """Ack a command message (consumer thread) within COMMAND_ACK_DELAY_S, in one round
        trip with the others taken meanwhile. Until then it stays unacked: a worker that dies
        first has it put back on its own queue, where a successor of the same name acts on
        it again (commands are idempotent). A timer lost with a connection does not hold the
        next acks back (as for events)."""
        self._acks.append(message)
        hub = getattr(self.consumer, "hub", None)
        if hub is None:
            self.flush_acks()
            return
        now = time.monotonic()
        if now - self._acks_scheduled_at < EVENT_FLUSH_STALE_S:
            return
        self._acks_scheduled_at = now
        hub.call_later(COMMAND_ACK_DELAY_S, self.flush_acks)

    def flush_acks(self) -> None:
        """Ack the commands `ack_soon` holds now (consumer thread)."""
        self._acks_scheduled_at = -1.0
        acks, self._acks = self._acks, []
        if not acks:
            return
        try:
            ack_many(acks)
        except Exception as exc:  # a lost connection: Redis puts them back (commands are idempotent)
            log.warning("acking %d command(s) failed: %s: %s", len(acks), type(exc).__name__, str(exc)[:200])

    def drop_acks(self) -> None:
        """Forget the acks held (consumer thread): their channel went with a lost
        connection, and Redis puts the messages back."""
        self._acks.clear()
        self._acks_scheduled_at = -1.0

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the consumer thread, in the order of the calls.

        kombu's hub keeps its ready callbacks in a set: a batch's "accepted" could run after
        its "completed", leaving the request in Celery's active requests forever (a leak the
        soak found). Ours go through a FIFO: whichever drain runs first runs them all, in order.
        """
        with self._soon_lock:
            self._soon.append((fn, args))
        self.consumer.call_soon(self._run_soon)

    def _run_soon(self) -> None:
        with self._soon_lock:
            todo, self._soon = self._soon, deque()
        for fn, args in todo:
            try:
                fn(*args)
            except Exception:  # one failing callback must not drop the ones after it
                log.exception("consumer-thread callback %r failed", fn)

    def consume(self, model_id: str, wake: bool = True) -> None:
        """Start consuming the model's queue, at once.

        kombu adds a queue to the next wait only, and the one in flight waits up to the
        polling interval (0.1 s) before returning: most of a cold request's overhead. A no-op
        command on our private queue (whose bell that wait watches) makes it return now.
        `wake=False`: the caller rings that bell itself (the model manager, with the copy's
        LOADED mark in one round trip).
        """
        self.call_soon(self._add_queue, self.keys.model_queue(model_id))
        if not wake:
            return
        try:
            self.send_command(self.name, Command(op="wake", model_id=model_id))
        except Exception as exc:  # only costs the polling interval
            log.warning("could not wake the consumer for %s: %s", model_id, exc)

    def _add_queue(self, queue: str) -> None:
        task_consumer = self.consumer.task_consumer
        if task_consumer is None or task_consumer.consuming_from(queue):
            return
        if queue not in self._declared:
            try:
                self.consumer.add_task_queue(queue)
            except self.consumer.connection_errors:
                raise
            except Exception as exc:
                # The declare only writes kombu's binding table (routing on the anonymous
                # exchange, as ours, never reads it): a write Redis refuses (out of memory, a
                # key of the wrong type, a permission) must not leave a LOADED model whose
                # queue nobody consumes, its requests waiting forever.
                log.error("declaring queue %s failed (%s: %s); consuming it without the declare",
                          queue, type(exc).__name__, str(exc)[:200])  # fmt: skip
            else:
                self._declared.add(queue)
                return
        # Declared by this worker before: its binding stays until the model is unregistered
        # (which forgets it here), so kombu's declare (a binding write and a queue-length read,
        # two round trips on this thread, on every reload) is skipped.
        auto, task_consumer.auto_declare = task_consumer.auto_declare, False
        try:
            self.consumer.add_task_queue(queue)
        finally:
            task_consumer.auto_declare = auto

    def forget_declared(self, model_id: str | None = None) -> None:
        """Declare the model's queue (None: every queue) afresh next time: its binding may be
        gone (a drain of an unregistered model deletes it; a Redis that came back lost all)."""
        if model_id is None:
            self._declared.clear()
        else:
            self.call_soon(self._declared.discard, self.keys.model_queue(model_id))

    def stop_consuming(self, model_id: str) -> None:
        self.call_soon(self._cancel_queue, self.keys.model_queue(model_id))

    def _cancel_queue(self, queue: str) -> None:
        task_consumer = self.consumer.task_consumer
        if task_consumer is not None and task_consumer.consuming_from(queue):
            self.consumer.cancel_task_queue(queue)

    def requeue(self, items: list[Pending], now: bool = False, wait_s: float = 0.0) -> None:
        """Put requests back on their queue (from the consumer thread, which owns the channel).

        `now`: the caller is the consumer thread. With `wait_s`, block until they are back in
        Redis, so a queue-depth check that follows sees them.
        """
        if not items:
            return
        for p in items:
            # the routing key is the producer's: an id this worker does not serve is no label
            self.metrics.requests.labels(self.metrics.model_label(self.keys.model_from_queue(
                (p.req.delivery_info or {}).get("routing_key") or "")), "requeued").inc()
        if now:
            reject_requeue(items)
            return
        done = threading.Event()
        # reject() itself defers the broker call with call_soon; a second hop runs after it
        self.call_soon(reject_requeue, items, lambda: self.call_soon(done.set))
        if wait_s and not done.wait(wait_s):
            log.warning("requeue of %d requests not confirmed within %.1fs", len(items), wait_s)

    def update_prefetch(self) -> None:
        """Budget prefetch from the served models' batch sizes so batches can fill."""
        budget = sum(2 * p.max_batch_size for p in self.batcher.policies().values())
        self.call_soon(self._set_budget, max(self.prefetch_floor, budget))

    def _set_budget(self, budget: int) -> None:
        self._budget = budget
        self._apply_qos()

    # ------------------------------------------------------------------ the byte bound
    def admitted(self, nbytes: int) -> None:
        """Consumer thread: a request of `nbytes` was buffered. Lowers the prefetch when the
        buffered bytes come near MESH_MAX_BUFFERED_BYTES, so the transport takes no more
        messages than fit (mesh/broker/transport.py takes at most the QoS's
        `can_consume_max_estimate()` a poll; kombu's MultiChannelPoller polls a channel only
        while `qos.can_consume()`): what does not fit waits in Redis, nothing is refused."""
        estimate = self._size_estimate * SIZE_DECAY
        self._size_estimate = float(nbytes) if nbytes > estimate else max(1.0, estimate)
        self.admitted_bytes += nbytes
        if not self.max_buffered_bytes:
            return
        buffered = self.batcher.buffered_bytes()
        if buffered > self._peak:
            self._peak = buffered
            self.metrics.buffered_bytes_max.set(buffered)
        # fast path: a whole budget of messages of the estimated size would still fit
        if self._limited or buffered + self._size_estimate * self._budget > self.max_buffered_bytes:
            self._apply_qos()

    def released(self, buffered: int) -> None:
        """Any thread: buffered requests were taken into a batch (or handed back): while the
        byte bound holds the prefetch down, compute it again on the consumer thread."""
        if self._limited:
            self.call_soon(self._apply_qos)

    def _apply_qos(self) -> None:
        """Consumer thread: the prefetch for the batch budget and the byte bound.

        Bound by bytes, the prefetch is the messages buffered plus as many of the estimated
        size as still fit, not counting the messages taken into a batch and not yet acked:
        kombu counts those too (its prefetch limit is on unacked messages), so a batch's
        completion frees no room here, only its take from the buffers did (`released`).
        Buffered bytes then stay below the bound plus one message of the estimated size."""
        count = self._budget
        limited = False
        if self.max_buffered_bytes:
            free = self.max_buffered_bytes - self.batcher.buffered_bytes()
            room = math.ceil(free / self._size_estimate) if free > 0 else 0
            if room < count:
                count, limited = max(1, min(count, self.batcher.buffered_messages() + room)), True
        self._limited = limited
        self._set_qos(count)

    def _set_qos(self, count: int) -> None:
        qos = self.consumer.qos
        if qos is None or (qos.value == count and qos.prev == count):
            return
        # `value`, not only the channel's count: Celery's event loop applies `value` again
        # whenever it differs from what was set last (celery/worker/loops.py `asynloop`: "if
        # qos.prev != qos.value: update_qos()"), which undid a bare `qos.set(count)`
        qos.value = count
        qos.update()


def reject_requeue(items: list[Pending], then: Callable[[], Any] | None = None) -> None:
    try:
        for p in items:
            p.req.reject(requeue=True)
            worker_state.task_ready(p.req)
    finally:
        if then is not None:
            then()
