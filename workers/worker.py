"""MeshWorker: one worker process's model serving, wired into a Celery consumer.

It owns the batcher, the model manager, the inference thread and the heartbeat, and is the
only place that touches the Celery consumer (queues, QoS, acks), always through
`consumer.call_soon`, because kombu channels belong to the consumer thread.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery.worker import state as worker_state
from threadpoolctl import threadpool_limits

from mesh.control.commands import send_command
from mesh.errors import MeshError, ModelLoadFailed, ModelNotFound
from mesh.protocol.keys import Keys
from mesh.models import Command, CopyState
from mesh.protocol.messages import SERVING_TTL_S
from mesh.settings import MeshSettings
from mesh.store.state import Route, StateStore

from .batcher import Batcher, BatchPolicy, Pending
from .heartbeat import Heartbeat
from .inference import InferenceLoop
from .manager import ModelManager
from .metrics import WorkerMetrics

log = logging.getLogger("mesh.worker")

# A failed model's queue is drained (every request answered with the error) at least this
# long after the failure, then the consumer is cancelled once the queue stays empty.
FAILED_DRAIN_MIN_S = 3.0
# After a model leaves this worker, watch its queue this long for requests that still arrive:
# every heartbeat, and every heartbeat.ORPHAN_FAST_CHECK_S for the first ORPHAN_FAST_S (the producers'
# serving cache, mesh.protocol.messages.SERVING_TTL_S, plus a margin).
ORPHAN_WATCH_S = 30.0
ORPHAN_FAST_S = SERVING_TTL_S + 0.5
# The cyclic GC's generation thresholds (Python's: 700, 10, 10). A worker allocates fast
# (requests, model loads) and frees nearly everything by reference counting; with the default
# a full collection, which walks every loaded model, came every few seconds.
GC_THRESHOLDS = (50_000, 20, 100)
EVENT_BUFFER_LIMIT = 256  # buffered events per flush (Celery: 24); flushed every loop turn anyway


class MeshWorker:
    def __init__(self, consumer: Any) -> None:
        self.c = consumer
        self.app = consumer.app
        conf = self.app.conf
        # the app's prefix/URL win over the environment, so a worker built for a custom
        # MeshClient app (tests) and its producers always agree
        self.settings = MeshSettings(prefix=conf.mesh_prefix, redis_url=conf.mesh_redis_backend_url)
        # Several worker processes share the host's cores: one BLAS/OpenMP thread each by
        # default, so batches do not fight over cores (the inference thread is the parallelism).
        threadpool_limits(self.settings.intra_op_threads)
        self.name: str = consumer.hostname
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.keys = Keys(self.settings.prefix)
        self.store = StateStore(
            redis.Redis.from_url(conf.mesh_redis_backend_url, health_check_interval=25),
            self.keys,
            self.settings,
        )
        self.priority_steps = list(conf.broker_transport_options.get("priority_steps", [0]))
        self.metrics = WorkerMetrics(self.name, self.settings.metrics_port)
        self.metrics.capacity_bytes.set(self.settings.worker_capacity_bytes)
        self.batcher = Batcher(self._queue_depths)
        self.manager = ModelManager(self)
        self.inference = InferenceLoop(self)
        self.heartbeat = Heartbeat(self)
        self.started_at = time.time()
        self.shutting_down = False
        self._threads_started = False
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-control")
        self._unloaded_lock = threading.Lock()
        self._soon: deque = deque()  # consumer-thread callbacks, in order (call_soon)
        self._soon_lock = threading.Lock()
        self._recently_unloaded: dict[str, float] = {}
        self._declared: set[str] = set()  # model queues this worker declared (consumer thread)

    @property
    def event_dispatcher(self) -> Any:
        d = self.c.event_dispatcher
        if d is not None and d.on_send_buffered is not None and "mesh" not in d.buffer_group:
            # Celery buffers task events and publishes them once per event-loop turn as one
            # `task.multi` message; `mesh-batch` events join that (one `mesh.multi` per turn,
            # not a PUBLISH per batch), and a turn's buffer may hold a whole large batch's
            # events (Celery flushes every 24). Receivers (Flower) take lists as they come.
            d.buffer_group = frozenset(d.buffer_group) | {"mesh"}
            d.buffer_limit = max(d.buffer_limit, EVENT_BUFFER_LIMIT)
        return d

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Called on every (re)connection of the consumer."""
        if not self._threads_started:
            self._threads_started = True
            # Everything allocated so far (Celery, kombu, the libraries: most of the heap) lives
            # as long as the process. Frozen, the cyclic GC stops walking it on every full
            # collection; with models loading and leaving, those came every few seconds and
            # stopped the whole worker for 120-260 ms each (multimodel bench).
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            # a line of loads left by an earlier process of this name would only mislead placement
            self.store.r.delete(self.keys.load_line(self.name))
            self.inference.start()
            self.heartbeat.start()
            log.info("mesh worker %s up: capacity %d bytes", self.name, self.settings.worker_capacity_bytes)
        else:
            # after a reconnect the buffered requests were dropped with the old channel;
            # re-consume the queues of everything still loaded
            for model_id in self.manager.loaded_ids():
                self.consume(model_id)
        self.update_prefetch()

    def on_connection_lost(self) -> None:
        # A Redis that comes back may have lost the bindings: declare every queue afresh.
        self._declared.clear()
        # The ack promises of buffered requests point at a dead channel; Redis redelivers them.
        policies = self.batcher.policies()
        loaded = set(self.manager.loaded_ids())
        for model_id in list(self.batcher.buffered()):
            self.batcher.close(model_id)
            if model_id in loaded and model_id in policies:
                self.batcher.open(model_id, policies[model_id])

    def manager_policy(self, model_id: str) -> BatchPolicy:
        return self.batcher.policies().get(model_id) or BatchPolicy(
            self.settings.max_batch_size, self.settings.max_batch_delay_ms / 1000.0
        )

    def shutdown(self) -> None:
        """Warm shutdown: hand our models to other workers, finish the running batch, leave.

        Requests still buffered are unacked, so closing the channel requeues them.
        """
        self.shutting_down = True
        loaded = self.manager.loaded_ids()
        try:
            self.heartbeat.beat()  # announce shutting_down so placement skips us
            for model_id in loaded:
                self._hand_over(model_id)
        except (redis.RedisError, MeshError) as exc:
            log.warning("could not hand over models on shutdown: %s", exc)
        self.batcher.stop()
        self.inference.stop()
        self.inference.join(timeout=30)
        self.heartbeat.stop()
        self._control.shutdown(wait=False, cancel_futures=True)
        self.manager.shutdown()
        self.metrics.close()
        try:
            self.store.remove_worker(self.name, loaded)
        except redis.RedisError as exc:
            log.warning("could not remove worker record on shutdown: %s", exc)

    def _hand_over(self, model_id: str) -> None:
        others = self.store.alive(
            w.worker for w in self.store.model_status(model_id).copies if w.worker != self.name
        )
        if others:
            return
        self.store.remove_copy(model_id, self.name)
        placement = self.store.place_load(model_id, exclude=[self.name])
        if placement.worker:
            send_command(self.app, self.keys, placement.worker, Command(op="load", model_id=model_id))
            log.info("handed %s over to %s", model_id, placement.worker)

    # ------------------------------------------------------------------ consumer thread
    def on_request(self, model_id: str | None, req: Any, items: int = 1, high: bool = False) -> None:
        if model_id is None or not self.batcher.add(model_id, req, items, high):
            # not (or no longer) served here: back to its queue for the copy that is
            self.requeue([Pending(req)], now=True)

    def run_control(self, name: str, fn: Any, kwargs: dict) -> None:
        """Run a scheduler task on the control thread (one at a time, in arrival order)."""
        self._control.submit(self._run_control, name, fn, kwargs)

    @staticmethod
    def _run_control(name: str, fn: Any, kwargs: dict) -> None:
        started = time.monotonic()
        try:
            fn(**kwargs)
        except Exception:  # a failed run is logged; the next tick runs again
            log.exception("%s failed", name)
        else:
            log.debug("%s ran in %.3fs", name, time.monotonic() - started)

    def on_command(self, cmd: Command) -> None:
        if cmd.op == "wake":
            return
        if cmd.op == "load":
            self.manager.request_load(cmd.model_id)
        else:
            fail = ModelNotFound(cmd.reason or f"model {cmd.model_id!r} was unregistered") if cmd.fail_queued else None
            self.manager.request_unload(cmd.model_id, fail)

    # ------------------------------------------------------------------ consumer plumbing
    def call_soon(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the consumer thread, in the order of the calls.

        kombu's hub keeps its ready callbacks in a set: a batch's "accepted" could run after
        its "completed", leaving the request in Celery's active requests forever (a leak the
        soak found). Ours go through a FIFO: whichever drain runs first runs them all, in order.
        """
        with self._soon_lock:
            self._soon.append((fn, args))
        self.c.call_soon(self._run_soon)

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
            send_command(self.app, self.keys, self.name, Command(op="wake", model_id=model_id))
        except Exception as exc:  # only costs the polling interval
            log.warning("could not wake the consumer for %s: %s", model_id, exc)

    def _add_queue(self, queue: str) -> None:
        consumer = self.c.task_consumer
        if consumer is None or consumer.consuming_from(queue):
            return
        if queue not in self._declared:
            self.c.add_task_queue(queue)
            self._declared.add(queue)
            return
        # Declared by this worker before: its binding stays until the model is unregistered
        # (which forgets it here), so kombu's declare (a binding write and a queue-length read,
        # two round trips on this thread, on every reload) is skipped.
        auto, consumer.auto_declare = consumer.auto_declare, False
        try:
            self.c.add_task_queue(queue)
        finally:
            consumer.auto_declare = auto

    def stop_consuming(self, model_id: str) -> None:
        self.call_soon(self._cancel_queue, self.keys.model_queue(model_id))

    def _cancel_queue(self, queue: str) -> None:
        if self.c.task_consumer is not None and self.c.task_consumer.consuming_from(queue):
            self.c.cancel_task_queue(queue)

    def requeue(self, items: list[Pending], now: bool = False, wait_s: float = 0.0) -> None:
        """Put requests back on their queue (from the consumer thread, which owns the channel).

        With `wait_s`, block until they are back in Redis, so a queue-depth check that follows
        sees them.
        """
        if not items:
            return
        for p in items:
            self.metrics.requests.labels(self.keys.model_from_queue(
                (p.req.delivery_info or {}).get("routing_key") or "") or "", "requeued").inc()
        if now:
            _reject_requeue(items)
            return
        done = threading.Event()
        # reject() itself defers the broker call with call_soon; a second hop runs after it
        self.call_soon(_reject_requeue, items, lambda: self.call_soon(done.set))
        if wait_s and not done.wait(wait_s):
            log.warning("requeue of %d requests not confirmed within %.1fs", len(items), wait_s)

    def update_prefetch(self) -> None:
        """Budget prefetch from the served models' batch sizes so batches can fill."""
        budget = sum(2 * p.max_batch_size for p in self.batcher.policies().values())
        self.call_soon(self._set_qos, max(self.settings.prefetch_floor, budget))

    def _set_qos(self, count: int) -> None:
        if self.c.qos is not None and self.c.qos.value != count:
            self.c.qos.set(count)

    # ------------------------------------------------------------------ failure paths
    def fail_model(self, model_id: str, error: MeshError) -> None:
        """Answer every queued and arriving request of the model with `error` for a while."""
        self.batcher.fail(model_id, error, self.manager_policy(model_id))
        self.consume(model_id)

    def on_load_failed(self, model_id: str, message: str) -> None:
        self.store.record_failure(model_id, self.name, message)
        placement = self.store.place_load(model_id, exclude=[self.name])
        if placement.worker:
            log.info("retrying the load of %s on %s", model_id, placement.worker)
            send_command(self.app, self.keys, placement.worker, Command(op="load", model_id=model_id))
            return
        self.fail_model(model_id, ModelLoadFailed(message))

    def on_copy_loaded(self, model_id: str) -> None:
        """A copy of `model_id` is now serving here: a vmodel transition waiting for it
        completes now, not at the next beat tick. On the control thread, so the next load does
        not wait for it; a failure there only delays the transition to that tick."""
        try:
            self.run_control("vmodel transitions", self._advance_transitions, {"model_id": model_id})
        except RuntimeError:  # shutting down: the control thread is gone, the next owner's tick does it
            pass

    def _advance_transitions(self, model_id: str) -> None:
        from mesh.control.vmodels import advance_for_model

        done = advance_for_model(self.store, self.app, model_id)
        if done:
            log.info("vmodel transition(s) to %s completed: %s", model_id, ", ".join(done))

    def after_unload(self, model_id: str, unregistered: bool) -> None:
        """An evicted model with requests still queued and no other copy gets a new load.

        Checked now and again by `maintenance` for a while: a producer that saw the copy just
        before it left may enqueue after this check.
        """
        if unregistered:
            # its queue's binding may go with it (a drain deletes it): declare it afresh next time
            self.call_soon(self._declared.discard, self.keys.model_queue(model_id))
        if unregistered or self.shutting_down:
            return
        with self._unloaded_lock:
            self._recently_unloaded[model_id] = time.monotonic()
        self._reload_if_orphaned(model_id)

    def _reload_if_orphaned(self, model_id: str, depth: int | None = None) -> bool:
        if depth is None:
            depth = self.store.queue_depth(model_id, self.priority_steps)
        if depth == 0:
            return False
        route = self.store.route(model_id, claimant=self.name, priority_steps=self.priority_steps, if_queued=True)
        if route is Route.CLAIMED:
            placement = self.store.place_load(model_id)
            if placement.worker:
                log.info("%s has queued requests and no copy: loading it on %s", model_id, placement.worker)
                send_command(self.app, self.keys, placement.worker, Command(op="load", model_id=model_id))
        return route is not Route.IDLE

    def adopt_orphans(self) -> None:
        """Load models whose requests wait in Redis with no copy anywhere (sent before any
        worker was up, or while every copy was gone). Run once the worker is announced."""
        records = self.store.list_records()
        if not records:
            return
        depths = self._queue_depths([r.model_id for r in records])
        for model_id, depth in depths.items():
            self._reload_if_orphaned(model_id, depth)

    def maintenance(self) -> None:
        """Periodic (heartbeat thread): announce copies whose records vanished, watch models
        that left for orphaned requests, stop draining failed models whose queue is empty, and
        come back to capacity after a deferral whose fresh copy nobody asked for."""
        self.manager.trim()  # first: local only, whatever Redis does
        self.reassert_copies()
        now = time.monotonic()
        with self._unloaded_lock:
            watch = [m for m, t in self._recently_unloaded.items() if now - t < ORPHAN_WATCH_S]
            self._recently_unloaded = {m: self._recently_unloaded[m] for m in watch}
        self._reload_orphans(watch)
        for model_id, (since, buffered) in self.batcher.failed_models().items():
            if now - since < FAILED_DRAIN_MIN_S or buffered:
                continue
            if self.store.queue_depth(model_id, self.priority_steps) == 0:
                self.stop_consuming(model_id)
                self.batcher.close(model_id)

    def watch_fresh_orphans(self) -> None:
        """Between heartbeats (every heartbeat.ORPHAN_FAST_CHECK_S): models that left this worker less
        than ORPHAN_FAST_S ago. Producers skip the route script for a model seen serving in
        the last second (mesh.protocol.messages.SERVING_TTL_S), so in that second requests still reach a
        queue nobody consumes and nobody claims; under churn (a rarely used model evicted by
        the next load) that is common, and waiting for the heartbeat cost them up to 2 s."""
        now = time.monotonic()
        with self._unloaded_lock:
            fresh = [m for m, t in self._recently_unloaded.items() if now - t < ORPHAN_FAST_S]
        if fresh:
            self._reload_orphans(fresh)

    def _reload_orphans(self, model_ids: list[str]) -> None:
        # one round trip for every watched queue (hundreds under churn), not one each
        gone = [m for m in model_ids if not self.batcher.is_open(m)]
        for model_id, depth in (self._queue_depths(gone) if gone else {}).items():
            self._reload_if_orphaned(model_id, depth)

    def reassert_copies(self) -> None:
        """Announce again the copies this worker serves whose records are gone from Redis
        (emptied, or restored from an older snapshot), so routing and status see them without
        a reload. Only for a model registered (again) with the info it was loaded from."""
        if self.shutting_down:
            return  # shutdown removes our copies; do not race it
        loaded = self.manager.loaded_records()
        if not loaded:
            return
        ids = list(loaded)
        with self.store.r.pipeline(transaction=False) as p:
            for model_id in ids:
                p.hexists(self.keys.copies(model_id), self.name)
            present = p.execute()
        for model_id, ok in zip(ids, present):
            if ok:
                continue
            record = self.store.get_record(model_id)
            if record is None or not record.info.same_model(loaded[model_id].info):
                continue
            if not self.store.mark_copy(model_id, self.name, CopyState.LOADED):
                continue
            if model_id in self.manager.loaded_ids():
                log.info("announced the copy of %s again (its record was missing from Redis)", model_id)
            else:  # evicted while we announced it
                self.store.remove_copy(model_id, self.name)

    def _queue_depths(self, model_ids: list[str]) -> dict[str, int]:
        keys = self.keys
        with self.store.r.pipeline(transaction=False) as p:
            for m in model_ids:
                for key in keys.queue_list_keys(keys.model_queue(m), self.priority_steps):
                    p.llen(key)
            flat = p.execute()
        n = len(self.priority_steps)
        return {m: sum(flat[i * n : (i + 1) * n]) for i, m in enumerate(model_ids)}


def _reject_requeue(items: list[Pending], then: Any = None) -> None:
    try:
        for p in items:
            p.req.reject(requeue=True)
            worker_state.task_ready(p.req)
    finally:
        if then is not None:
            then()
