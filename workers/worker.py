"""MeshWorker: one worker process's model serving, wired into a Celery consumer.

It builds the parts and hands each exactly its collaborators (Celery's
`celery/worker/consumer/heart.py` does the same: `Heart(timer, eventer, interval)`):

- `CeleryConsumer` (workers/consumer.py): the consumer port, the only part touching the
  Celery consumer's queues, QoS and requeues, always through its `call_soon`;
- `Batcher`: per-model buffers; `ModelManager`: the byte-bounded cache of loaded models;
  `InferenceLoop`: the inference and results threads; `Heartbeat`: the worker's state in
  Redis, with this worker's periodic duties attached as hooks.

What the parts tell the worker comes back through `CopyEvents` (workers/ports.py), which this
class implements: a copy loaded, a load failed, a copy left, a model failed. The worker's own
duties are the cold path's safety nets: orphaned requests (a model whose requests wait with
no copy anywhere) and copies whose records vanished from Redis.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis
from celery.app.task import Context
from threadpoolctl import threadpool_limits

from mesh.broker import transport
from mesh.broker.transport import set_dead_letter_handler
from mesh.control.commands import send_command
from mesh.control.vmodels import VModelManager
from mesh.errors import DeliveryLimitExceeded, MeshError, ModelLoadFailed, ModelNotFound
from mesh.models import Command, CopyState
from mesh.policy.commands import UnloadAction, unload_action
from mesh.protocol.messages import SERVING_TTL_S
from mesh.settings import MeshSettings
from mesh.storage.sources import get_storage
from mesh.store.context import StoreContext
from mesh.store.failover import FailoverStore
from mesh.store.state import Route
from mesh.store.strays import StrayStore

from .batcher import Batcher, BatchPolicy, Pending
from .collector import Collector
from .consumer import CeleryConsumer
from .heartbeat import Heartbeat, WorkerIdentity
from .inference import InferenceLoop
from .manager import ModelManager
from .memory import SLIM_MIN_BYTES, malloc_trim, slim
from .metrics import WorkerMetrics
from .strategy import refuse_envelope
from .strays import StraySweeper
from .threadnames import name_os_thread
from .wanted import WantedLoads

log = logging.getLogger("mesh.worker")

# A failed model's queue is drained (every request answered with the error) at least this
# long after the failure, then the consumer is cancelled once the queue stays empty.
FAILED_DRAIN_MIN_S = 3.0
# After a model leaves this worker, watch its queue this long for requests that still arrive:
# every heartbeat, and every heartbeat.ORPHAN_FAST_CHECK_S for the first ORPHAN_FAST_S (the
# producers' serving cache, mesh.protocol.messages.SERVING_TTL_S, plus a margin).
ORPHAN_WATCH_S = 30.0
ORPHAN_FAST_S = SERVING_TTL_S + 0.5
# The cyclic GC's generation thresholds (Python's: 700, 10, 10). A worker allocates fast
# (requests, model loads) and frees nearly everything by reference counting; with the default
# a full collection, which walks every loaded model, came every few seconds.
GC_THRESHOLDS = (50_000, 20, 100)
# After this many bytes of requests were buffered since the last trim, the next heartbeat hands
# the heap's free pages back to the system (workers/memory.py `malloc_trim`).
TRIM_EVERY_BYTES = 64 * 1024**2


def warn_about_trust(settings: MeshSettings) -> None:
    """Say at start, loudly, what this worker lets a model record make it do (docs/security.md)."""
    roots = get_storage(settings).roots
    if roots.unrestricted:
        log.warning(
            "MESH_STORAGE_ROOTS is %s: this worker loads models from ANY path or bucket a model "
            "record names, and loading a model file runs its code, so anyone who can write to this "
            "mesh's Redis can run code here. Set MESH_STORAGE_ROOTS (or MESH_MODEL_DIR) outside "
            "local development.", "* (anywhere)" if settings.storage_roots else "unset and nothing is configured")
    else:
        log.info("models load only from %s (%s)", roots.describe(), roots.source)
    if settings.python_modules:
        log.info("python-runtime model classes allowed from: %s", settings.python_modules)


class MeshWorker:
    """Builds a worker's parts around one Celery consumer and implements `CopyEvents`."""

    def __init__(self, consumer: Any) -> None:
        self.app = consumer.app
        conf = self.app.conf
        ctx = StoreContext.from_app(self.app)  # the app's prefix and URL, not the environment's
        self.settings = settings = ctx.settings
        self.keys, self.store = ctx.keys, ctx.store
        # Several worker processes share the host's cores: one BLAS/OpenMP thread each by
        # default, so batches do not fight over cores (the inference thread is the parallelism).
        threadpool_limits(settings.intra_op_threads)
        self.name: str = consumer.hostname  # Celery node name, e.g. w1@vm
        # This process's holder id: the pop script records it with every message this worker
        # takes (mesh/broker/transport.py), so live workers put those back as soon as this
        # process's alive key expires (mesh/store/failover.py). Unique per process: a restart
        # under the same node name is not its dead predecessor. Set before the consumer
        # connects (this runs in the consumer blueprint's __init__; kombu's Channel copies
        # `from_transport_options` when it is created).
        self.holder = f"{self.name}.{uuid.uuid4().hex[:12]}"
        holder_ttl_s = max(settings.heartbeat_ttl_s, 2 * settings.heartbeat_interval_s)
        conf.broker_transport_options = {
            **conf.broker_transport_options, "mesh_holder": self.holder,
            "mesh_holder_ttl_ms": int(holder_ttl_s * 1000),
        }  # fmt: skip
        self.failover = FailoverStore(self.store.r, self.keys)
        set_dead_letter_handler(self.holder, self._answer_dead_letter)
        self.priority_steps = list(conf.broker_transport_options.get("priority_steps", [0]))
        self.metrics = WorkerMetrics(self.name, settings.metrics_port, settings.metrics_retention_s,
                                     settings.metrics_addr)  # fmt: skip
        self.metrics.capacity_bytes.set(settings.worker_capacity_bytes)
        # messages the transport drops (garbage, malformed envelopes) are counted and, when
        # they are requests with a usable id, answered
        transport.on_rejected(self.keys.kombu_prefix, self._envelope_rejected)
        self.batcher = Batcher(self._queue_depths, on_release=lambda b: self.consumer.released(b))
        self.consumer = CeleryConsumer(
            consumer, self.keys, self.name, self.batcher, self.metrics,
            self._send_command, settings.prefetch_floor,
            settings.max_buffered_bytes, 2 * settings.max_request_bytes,  # the strategy's largest body
        )  # fmt: skip
        self._trimmed_at = 0  # consumer.admitted_bytes at the last malloc_trim
        # full collections when there is something for one to free (workers/collector.py)
        self.collector = Collector(failures=lambda: self.inference.stats.failures + self.metrics.rejections)
        self.manager = ModelManager(
            settings, self.name, self.store, self.batcher, self.metrics, self.consumer, events=self,
            collector=self.collector,
        )  # fmt: skip
        self.inference = InferenceLoop(
            self.batcher, self.manager, self.consumer, self.metrics, self.keys,
            backend=lambda: self.app.backend, result_expires_s=settings.result_expires_s,
        )  # fmt: skip
        self.shutting_down = False
        self._adopted = False
        self.heartbeat = Heartbeat(
            self.store,
            WorkerIdentity(self.name, socket.gethostname(), os.getpid(), time.time(),
                           settings.worker_capacity_bytes, settings.labels),  # fmt: skip
            self.manager, self.inference.stats, self.metrics,
            shutting_down=lambda: self.shutting_down,
            interval_s=settings.heartbeat_interval_s, ttl_s=settings.heartbeat_ttl_s,
            after_beat=[self.fail_over, self.adopt_orphans_once, self.maintenance],
            between_beats=[self.watch_fresh_orphans],
        )  # fmt: skip
        self.wanted = WantedLoads(self.store, self.load_wanted)
        self._threads_started = False
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-control", initializer=name_os_thread)
        self._unloaded_lock = threading.Lock()
        self._recently_unloaded: dict[str, float] = {}
        self.strays = StraySweeper(
            StrayStore(self.store.r, self.keys, self.priority_steps), lambda: self.app.backend,
            token=f"{self.name}:{os.getpid()}:{time.time()}",
            interval_s=settings.stray_sweep_interval_s, grace_s=settings.stray_grace_s,
            scan_keys=settings.stray_scan_keys, reroute=self._reroute_to_active,
        )  # fmt: skip
        self._stray_sweep: Future | None = None
        self._stray_due = 0.0

    def _send_command(self, worker: str, cmd: Command) -> None:
        send_command(self.store, worker, cmd)

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
            self.store.clear_load_line(self.name)
            self.inference.start()
            # this process is a holder (its alive key, the set of holders) before its first
            # heartbeat announces it, and a dead predecessor's messages go back at once
            try:
                self.fail_over()
            except redis.RedisError as exc:  # the heartbeat's duties try again
                log.warning("failover check at start failed: %s", exc)
            self.heartbeat.start()
            self.wanted.start()
            log.info("mesh worker %s up: capacity %d bytes", self.name, self.settings.worker_capacity_bytes)
            warn_about_trust(self.settings)
        else:
            # after a reconnect the buffered requests were dropped with the old channel;
            # re-consume the queues of everything still loaded
            for model_id in self.manager.loaded_ids():
                self.consumer.consume(model_id)
        self.consumer.event_dispatcher()  # buffering set up before the first request's events
        self.consumer.update_prefetch()

    def on_connection_lost(self) -> None:
        # A Redis that comes back may have lost the bindings: declare every queue afresh.
        self.consumer.forget_declared()
        self.consumer.drop_acks()
        # The ack promises of buffered requests point at a dead channel; Redis redelivers them.
        policies = self.batcher.policies()
        loaded = set(self.manager.loaded_ids())
        for model_id in list(self.batcher.buffered()):
            self.batcher.close(model_id)
            if model_id in loaded and model_id in policies:
                self.batcher.open(model_id, policies[model_id])

    def batch_policy(self, model_id: str) -> BatchPolicy:
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
        self.wanted.stop()
        self._control.shutdown(wait=False, cancel_futures=True)
        self.manager.shutdown()
        transport.on_rejected(self.keys.kombu_prefix, None)
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
            self._send_command(placement.worker, Command(op="load", model_id=model_id))
            log.info("handed %s over to %s", model_id, placement.worker)

    # ------------------------------------------------------------------ consumer thread
    def on_request(self, model_id: str | None, req: Any, items: int = 1, high: bool = False,
                   requeue: bool = True) -> bool:  # fmt: skip
        """Buffer a request; False: not served here and `requeue` is False (the caller refuses it)."""
        body = req._message.body
        nbytes = len(body) if body is not None else 0
        del body
        if nbytes >= SLIM_MIN_BYTES and model_id is not None:
            slim(req)  # its tensors as arrays, its body's copies dropped: ~7x less memory held
        if model_id is not None and self.batcher.add(model_id, req, items, high, nbytes):
            self.consumer.admitted(nbytes)  # the byte bound (MESH_MAX_BUFFERED_BYTES)
            return True
        if not requeue:
            return False
        # not (or no longer) served here: back to its queue for the copy that is
        self.consumer.requeue([Pending(req)], now=True)
        return True

    def reject_message(self, reason: str) -> None:
        """A message was dropped or refused before it could be served (workers/metrics.py REJECT_REASONS)."""
        self.metrics.reject(reason)

    def _envelope_rejected(self, reason: str, envelope: dict | None) -> None:
        self.metrics.reject(reason)
        refuse_envelope(self.app, envelope, reason)

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
            return
        action = self._unload_action(cmd)
        if action is UnloadAction.IGNORE:
            log.info("ignoring a stale unload of %s: the model was registered again since it was sent", cmd.model_id)
            return
        fail = None
        if cmd.fail_queued and action is UnloadAction.ACT:
            fail = ModelNotFound(cmd.reason or f"model {cmd.model_id!r} was unregistered")
        self.manager.request_unload(cmd.model_id, fail)

    def _unload_action(self, cmd: Command) -> UnloadAction:
        """Whether an unload is stale (mesh/policy/commands.py): one read of the model's record,
        for commands that name a generation."""
        if cmd.generation is None:
            return UnloadAction.ACT
        try:
            record = self.store.get_record(cmd.model_id)
        except redis.RedisError as exc:  # as before generations: the command is acted on
            log.warning("could not read the record of %s for an unload (%s): acting on it", cmd.model_id, exc)
            return UnloadAction.ACT
        loaded = self.manager.loaded_records().get(cmd.model_id)
        return unload_action(
            cmd.generation, record.created_at if record else None, loaded.created_at if loaded else None
        )

    # ------------------------------------------------------------------ CopyEvents
    def fail_model(self, model_id: str, error: MeshError) -> None:
        """Answer every queued and arriving request of the model with `error` for a while."""
        self.batcher.fail(model_id, error, self.batch_policy(model_id))
        self.consumer.consume(model_id)

    def load_failed(self, model_id: str, message: str) -> None:
        self.store.record_failure(model_id, self.name, message)
        placement = self.store.place_load(model_id, exclude=[self.name])
        if placement.worker:
            log.info("retrying the load of %s on %s", model_id, placement.worker)
            self._send_command(placement.worker, Command(op="load", model_id=model_id))
            return
        self.fail_model(model_id, ModelLoadFailed(message))

    def load_refused(self, model_id: str, reason: str) -> None:
        """This worker may not hold the model (its required labels, docs/operations.md "Worker
        pools"): hand the load to a worker that may, or to nobody (the model's status says why)."""
        placement = self.store.place_load(model_id, exclude=[self.name])
        if placement.worker:
            log.info("handing the load of %s to %s: %s", model_id, placement.worker, reason)
            self._send_command(placement.worker, Command(op="load", model_id=model_id))
        else:
            log.warning("refused to load %s (%s) and no live worker may: %s", model_id, reason,
                        placement.unmatched or placement.error or "no live worker")  # fmt: skip

    def copy_loaded(self, model_id: str) -> None:
        """A copy of `model_id` is now serving here: a vmodel transition waiting for it
        completes now, not at the next beat tick. On the control thread, so the next load does
        not wait for it; a failure there only delays the transition to that tick."""
        try:
            self.run_control("vmodel transitions", self._advance_transitions, {"model_id": model_id})
        except RuntimeError:  # shutting down: the control thread is gone, the next owner's tick does it
            pass

    @functools.cached_property
    def _vmodels(self) -> VModelManager:
        # one for the process: each built its scripts afresh (hashing their text), on every
        # load (the control thread's share of a worker's CPU at `closedloop zipf`, mostly)
        return VModelManager(self.app, self.store)

    def _advance_transitions(self, model_id: str) -> None:
        done = self._vmodels.advance_for_model(model_id)
        if done:
            log.info("vmodel transition(s) to %s completed: %s", model_id, ", ".join(done))

    def copy_unloaded(self, model_id: str, unregistered: bool) -> None:
        """An evicted model with requests still queued and no other copy gets a new load.

        Checked now and again by `maintenance` for a while: a producer that saw the copy just
        before it left may enqueue after this check.
        """
        if unregistered:
            # its queue's binding may go with it (a drain deletes it): declare it afresh next time
            self.consumer.forget_declared(model_id)
        if unregistered or self.shutting_down:
            return
        with self._unloaded_lock:
            self._recently_unloaded[model_id] = time.monotonic()
        self._reload_if_orphaned(model_id)

    # ------------------------------------------------------------------ heartbeat duties
    def _reroute_to_active(self, model_id: str) -> None:
        """The stray sweep's first step for a queue: its vmodel requests to their vmodel's
        active model (`VModelManager.reroute_to_active`)."""
        self._vmodels.reroute_to_active(model_id, self.priority_steps)

    def fail_over(self) -> None:
        """Every heartbeat, first: keep this process's alive key, and put back on their queues
        the unacked messages of worker processes whose alive key expired (SIGKILLed, crashed,
        cut off), so their requests are answered within a heartbeat TTL and an interval, not a
        visibility timeout (docs/reliability.md, "Worker death")."""
        dead, dead_letters = self.failover.beat(self.holder, self.heartbeat.ttl)
        self.metrics.dead_letters.set(dead_letters)
        for holder in dead:
            n, queues = self.failover.restore_holder(holder)
            if n <= 0:
                continue
            self.metrics.failover_restored.inc(n)
            log.warning("put back %d unacked message(s) of %s, a worker process that is gone", n, holder)
            # the dead process may have held the only copy: its requests must not wait in a
            # queue nobody consumes (the cold path's claim, as for any orphaned queue)
            for queue in queues:
                model_id = self.keys.model_from_queue(queue)
                if model_id is not None and not self.batcher.is_open(model_id):
                    self._reload_if_orphaned(model_id)

    def _answer_dead_letter(self, message: dict, queue: str) -> None:
        """Consumer thread: the pop script dead-lettered `message` instead of delivering it;
        its producer gets DeliveryLimitExceeded when the message names a task id (and, for a
        mesh producer, its reply list)."""
        self.metrics.dead_lettered.inc()
        headers = message.get("headers")
        props = message.get("properties")
        task_id = headers.get("id") if isinstance(headers, dict) else None
        if not isinstance(task_id, str) or not task_id:
            return
        reply_to = props.get("reply_to") if isinstance(props, dict) else None
        error = DeliveryLimitExceeded(
            f"request {task_id} of queue {queue} was delivered {self.settings.max_deliveries} times and "
            "each time its worker died or stalled: dead-lettered (`mesh dead-letters list`)"
        )  # fmt: skip
        reply = reply_to if isinstance(reply_to, str) else None
        self.app.backend.mark_as_failure(task_id, error, request=Context(id=task_id, reply_to=reply))

    def _reload_if_orphaned(self, model_id: str, depth: int | None = None) -> bool:
        if depth is None:
            depth = self.store.queue_depth(model_id, self.priority_steps)
        if depth == 0:
            return False
        route, placement, _ = self.store.route_and_place(
            model_id, claimant=self.name, priority_steps=self.priority_steps, if_queued=True
        )  # fmt: skip
        if placement is not None and placement.worker:
            log.info("%s has queued requests and no copy: loading it on %s", model_id, placement.worker)
            if placement.worker == self.name:
                # most often the model's home is where it just left: no command round trip
                self.manager.request_load(model_id)
            else:
                self._send_command(placement.worker, Command(op="load", model_id=model_id))
        return route is not Route.IDLE

    def load_wanted(self, model_id: str) -> None:
        """A producer that may not place loads asked for this model (workers/wanted.py): route
        and place as it would have; nothing when the model is served, loading or unknown."""
        _route, placement, _ = self.store.route_and_place(
            model_id, claimant=self.name, priority_steps=self.priority_steps
        )  # fmt: skip
        if placement is not None and placement.worker:
            if placement.worker == self.name:
                self.manager.request_load(model_id)
            else:
                self._send_command(placement.worker, Command(op="load", model_id=model_id))

    def adopt_orphans_once(self) -> None:
        """After the first heartbeat that reached Redis (then the worker is announced): load
        the models whose requests wait with no copy anywhere (sent before any worker was up,
        or while every copy was gone)."""
        if self._adopted:
            return
        records = self.store.list_records()
        if records:
            depths = self._queue_depths([r.model_id for r in records])
            for model_id, depth in depths.items():
                self._reload_if_orphaned(model_id, depth)
        self._adopted = True

    def maintenance(self) -> None:
        """Every heartbeat: run a full collection if one is due (workers/collector.py), announce
        copies whose records vanished, watch models that left for orphaned requests, stop
        draining failed models whose queue is empty, come back to capacity after a deferral
        whose fresh copy nobody asked for, and now and then sweep for requests of models no
        longer registered."""
        self.manager.trim()  # first: local only, whatever Redis does
        self.collector.maybe_collect()
        self.metrics.buffered_bytes.set(self.batcher.buffered_bytes())
        admitted = self.consumer.admitted_bytes
        if admitted - self._trimmed_at >= TRIM_EVERY_BYTES:
            self._trimmed_at = admitted
            malloc_trim()  # large requests were answered: give their freed heap back
        loaded, loading, _ = self.manager.snapshot()
        self.metrics.sweep([*(m.model_id for m in loaded), *loading, *self.batcher.buffered()])
        self.reassert_copies()
        now = time.monotonic()
        self._sweep_strays(now)
        with self._unloaded_lock:
            watch = [m for m, t in self._recently_unloaded.items() if now - t < ORPHAN_WATCH_S]
            self._recently_unloaded = {m: self._recently_unloaded[m] for m in watch}
        self._reload_orphans(watch)
        for model_id, (since, buffered) in self.batcher.failed_models().items():
            if now - since < FAILED_DRAIN_MIN_S or buffered:
                continue
            if self.store.queue_depth(model_id, self.priority_steps) == 0:
                self.consumer.stop_consuming(model_id)
                self.batcher.close(model_id)

    def _sweep_strays(self, now: float) -> None:
        """Every MESH_STRAY_SWEEP_INTERVAL_S, try for the pool's sweep (workers/strays.py), on
        the control thread: answering a long queue must not hold up the heartbeat."""
        if self.shutting_down or now < self._stray_due or (self._stray_sweep and not self._stray_sweep.done()):
            return
        self._stray_due = now + self.settings.stray_sweep_interval_s
        try:
            self._stray_sweep = self._control.submit(self._run_control, "stray sweep", self.strays.sweep, {})
        except RuntimeError:  # shutting down: the control thread is gone
            pass

    def watch_fresh_orphans(self) -> None:
        """Between heartbeats (every heartbeat.ORPHAN_FAST_CHECK_S): models that left this worker less
        than ORPHAN_FAST_S ago. Producers skip the route script for a model seen serving in
        the last second (mesh.protocol.messages.SERVING_TTL_S), so in that second requests still
        reach a queue nobody consumes and nobody claims; under churn (a rarely used model evicted
        by the next load) that is common, and waiting for the heartbeat cost them up to 2 s."""
        now = time.monotonic()
        with self._unloaded_lock:
            fresh = [m for m, t in self._recently_unloaded.items() if now - t < ORPHAN_FAST_S]
        if fresh:
            self._reload_orphans(fresh)

    def _reload_orphans(self, model_ids: list[str]) -> None:
        # one round trip for every watched queue (hundreds under churn), whose reply names
        # only the queues that hold requests
        gone = [m for m in model_ids if not self.batcher.is_open(m)]
        for model_id, depth in self.store.queued(gone, self.priority_steps).items():
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
        for model_id, ok in self.store.copies_recorded(list(loaded), self.name).items():
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
        return self.store.queue_depths(model_ids, self.priority_steps)
