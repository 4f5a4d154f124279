"""The inference thread: take the oldest ready batch, predict, store every result, then ack.

Per batch: decode and check each item's tensors (a bad one fails alone, before batching),
concatenate along the batch dimension, predict in chunks of at most `max_batch_size` items,
split the outputs back per item and encode them; then the results thread stores every
message's result in one Redis pipeline, and only then (on the consumer thread) each message is
acked and its task events sent. A predict that raises is bisected until the guilty items are
found; their batch-mates still succeed.

Why a results thread: a thread that waits on a socket gives up the interpreter lock, and in a
busy worker (loads unpickling, the consumer decoding) taking it back costs up to the switch
interval (5 ms). Storing the results inline made the inference thread pay that once per batch
before it could start the next one; handed off, the next batch is predicted meanwhile
(multimodel bench: docs/benchmarks.md, "results off the inference thread, hiredis").

A message is either one request (`kwargs["inputs"]`) or a client micro-batch
(`kwargs["items"]`, from `MeshClient.infer_many`) whose items are batched like requests and
answered together, each with its own outputs or error.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import LRUCache
from celery import states
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from mesh.broker.pipeline import PackedPipeline
from mesh.broker.results import check_replies, push_reply, success_record
from mesh.broker.transport import ack_in, ack_many, forget_acked, redis_server
from mesh.errors import InferenceError, InvalidInput, MeshError, PredictTimeout
from mesh.protocol.messages import SENT_AT_HEADER
from mesh.protocol.tensors import decode_inputs, decode_output_names, decode_stacked, encode_outputs

from .batcher import Batch, Batcher, Pending
from .metrics import outcome_of
from .threadnames import name_os_thread

if TYPE_CHECKING:
    from mesh.protocol.keys import Keys

    from .manager import Entry, ModelManager
    from .metrics import WorkerMetrics
    from .ports import ConsumerPort

log = logging.getLogger("mesh.worker.inference")

# Batches whose results may wait for the results thread. Past that the inference thread waits
# too (Redis slow or away): memory stays bounded, and a worker that cannot store results stops
# taking work from its buffers, which then go back to their queues on eviction or shutdown.
RESULTS_BACKLOG = 4
# A model whose last batch predicted faster than this has its requests' task-started events
# sent with their completion (one consumer-thread wake-up per batch instead of two); a slower
# one's are sent as its predict starts, so Flower and `celery inspect active` show it running.
ACCEPT_APART_S = 0.005
# The predict watchdog (issue 21, finding 7). A Python thread cannot be killed, so a predict
# call past its model's timeout is abandoned: the watchdog answers its batch with
# PredictTimeout, starts a new inference thread (the other models are served again at once)
# and has the model manager take the copy out of service. Abandoned threads still running
# beyond MAX_STUCK_PREDICTS (each may hold a core and its model's memory): the worker exits for
# its supervisor (SIGTERM, a warm shutdown that hands its models over).
MAX_STUCK_PREDICTS = 2
WATCHDOG_IDLE_S = 1.0  # how often the watchdog looks for a predict to watch when none runs


@dataclass
class Unit:
    """One item to predict: a request, or one element of a micro-batch."""

    inputs: dict[str, np.ndarray] | None = None
    rows: int = 0
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    tb: str | None = None
    wanted: tuple[str, ...] | None = None  # the outputs the request named (None: the default)


@dataclass
class Message:
    """One Celery message of the batch and its units (one, or one per micro-batch item)."""

    pending: Pending
    units: list[Unit]
    many: bool = False
    error: BaseException | None = None  # the whole message is malformed or its model failed
    tb: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or (not self.many and self.units[0].error is not None)

    @property
    def failure(self) -> tuple[BaseException | None, str | None]:
        """(error, traceback) the message fails with as a whole, or (None, None): its own, or
        its one unit's (a micro-batch's failed items are answered among its results)."""
        if self.error is not None:
            return self.error, self.tb
        if not self.many and self.units[0].error is not None:
            return self.units[0].error, self.units[0].tb
        return None, None


class _Abandoned(BaseException):
    """Raised in an inference thread whose predict the watchdog gave up on, when the predict
    returns at last: the thread ends without touching the batch (answered already). A
    BaseException, so that the bisection's `except Exception` does not retry it."""


@dataclass
class _Watch:
    """The batch of one inference thread while its predict calls run (the watchdog's view)."""

    entry: Entry
    batch: Batch
    messages: list[Message]
    timeout_s: float
    started_wall: float
    started: float
    accepted: tuple | None
    thread: threading.Thread
    deadline: float = 0.0  # monotonic deadline of the predict call running; 0: none running
    fired: bool = False


@dataclass
class Stats:
    """Counters for the heartbeat (totals; the heartbeat turns them into rates)."""

    requests: int = 0
    batches: int = 0
    failures: int = 0
    per_model: dict[str, int] = field(default_factory=dict)  # requests answered per model
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model_id: str, requests: int, failures: int) -> None:
        with self.lock:
            self.requests += requests
            self.batches += 1
            self.failures += failures
            self.per_model[model_id] = self.per_model.get(model_id, 0) + requests

    def model_totals(self) -> dict[str, int]:
        with self.lock:
            return dict(self.per_model)


class InferenceLoop(threading.Thread):
    """The inference thread, with its results thread.

    `backend` returns Celery's result backend for the calling thread (`app.backend` is
    thread-local: each thread stores through its own connection).
    """

    def __init__(
        self,
        batcher: Batcher,
        manager: ModelManager,
        consumer: ConsumerPort,
        metrics: WorkerMetrics,
        keys: Keys,
        backend: Callable[[], Any],
        result_expires_s: float,
    ) -> None:
        super().__init__(name="mesh-inference", daemon=True)
        self.batcher = batcher
        self.manager = manager
        self.consumer = consumer
        self.metrics = metrics
        self.keys = keys
        self.backend = backend
        self.result_expires_s = result_expires_s
        self.stats = Stats()
        self._last_compute_s: LRUCache = LRUCache(maxsize=4096)  # model id -> its last batch's predict time
        self._stop_requested = threading.Event()
        self.pid = os.getpid()
        self._results = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-results",
                                           initializer=name_os_thread)
        self._results_room = threading.BoundedSemaphore(RESULTS_BACKLOG)
        # the predict watchdog: the running batch's watch, the thread serving batches now (this
        # one until a predict hangs), the abandoned ones
        self._watch: _Watch | None = None
        self._watch_lock = threading.Lock()
        self._serving: threading.Thread = self
        self._stuck: list[threading.Thread] = []
        self._watchdog = threading.Thread(target=self._watch_predicts, name="mesh-watchdog", daemon=True)

    def start(self) -> None:
        super().start()
        self._watchdog.start()

    def stop(self) -> None:
        self._stop_requested.set()

    def join(self, timeout: float | None = None) -> None:
        """Join the thread serving batches now (a replacement, after a hung predict)."""
        serving = self._serving
        if serving is self:
            super().join(timeout)
        else:
            serving.join(timeout)

    def run(self) -> None:
        self._serve()

    def _serve(self) -> None:
        name_os_thread()
        batcher = self.batcher
        me = threading.current_thread()
        while not self._stop_requested.is_set() and self._serving is me:
            batch = batcher.take(timeout=0.5)
            if batch is None:
                continue
            try:
                self.process(batch)
            except _Abandoned:  # replaced while its predict hung: the batch was answered
                log.warning("abandoned inference thread %s: its predict of %s returned at last",
                            me.name, batch.model_id)  # fmt: skip
                return
            except Exception:  # the loop must survive anything a batch throws at it
                log.exception("batch of %s failed unexpectedly", batch.model_id)
                self._fail_batch(batch, InferenceError("internal error in the batch loop"))
        # the batches predicted before the stop are stored and acked before the thread ends
        # (the worker's shutdown joins it)
        if self._serving is me:
            self._results.shutdown(wait=True)

    def _fail_batch(self, batch: Batch, error: MeshError) -> None:
        try:
            self._finish([Message(p, [Unit()], error=error) for p in batch.items], batch, 0.0)
        except Exception:  # the failure could not even be encoded: leave them unacked
            log.exception("could not answer the failure of %d requests; they stay unacked "
                          "and are redelivered", len(batch.items))

    # ------------------------------------------------------------------ one batch
    def process(self, batch: Batch) -> None:
        items = self._drop_expired(batch.items, batch.model_id)
        if not items:
            return
        if batch.error is not None:
            self._finish([Message(p, [Unit()], error=batch.error) for p in items], batch, 0.0)
            return
        entry = self.manager.acquire(batch.model_id, len(items))
        if entry is None:  # evicted between buffering and now: another copy will answer
            self.consumer.requeue(items)
            return
        try:
            self._run(entry, items, batch)
        finally:
            self.manager.release(entry)

    def _drop_expired(self, items: list[Pending], model_id: str) -> list[Pending]:
        now = time.time()
        live, expired = [], []
        for p in items:
            exp = p.req.expires
            (expired if exp is not None and exp.timestamp() <= now else live).append(p)
        if expired:  # labelled by the served model, not by the messages' (producer's) routing keys
            self.metrics.requests.labels(model_id, "expired").inc(len(expired))
        if expired:
            # Request.revoked() marks REVOKED in the backend, acks and sends task-revoked;
            # it touches the channel, so it runs on the consumer thread.
            self.consumer.call_soon(_revoke_all, expired)
        return live

    def _run(self, entry: Entry, items: list[Pending], batch: Batch) -> None:
        loaded = entry.loaded
        messages = [self._decode(p, loaded) for p in items]
        good = [u for m in messages if m.error is None for u in m.units if u.error is None]
        compute_s = 0.0
        started_wall = time.time()
        accepted = None
        if good:
            start = time.monotonic()
            started = [m.pending for m in messages if m.error is None and any(u.error is None for u in m.units)]
            quick = self._last_compute_s.get(batch.model_id, ACCEPT_APART_S) < ACCEPT_APART_S
            if quick:
                # its task-started events ride with the completion: waking the consumer thread
                # for them in the middle of a sub-millisecond predict slowed the predict down
                accepted = (started, self.pid, start)
            else:
                self.consumer.call_soon(_accept_all, started, self.pid, start)
            size = entry.policy.max_batch_size
            timeout_s = entry.policy.predict_timeout_s
            watch = None
            if timeout_s > 0:
                watch = _Watch(entry, batch, messages, timeout_s, started_wall, start, accepted,
                               threading.current_thread())  # fmt: skip
                self._watch = watch
            try:
                # requests naming different outputs share the batch's wait but not a predict
                # call: the runtime computes one set of outputs per call
                for group in _by_outputs(good):
                    for i in range(0, len(group), size):
                        self._predict(loaded.runtime, loaded.model, group[i : i + size], watch)
            finally:
                # not once fired: a replacement thread owns `_watch` then (and after `_disarm`
                # saw it unfired, the watchdog can no longer fire on it)
                if watch is not None and not watch.fired:
                    self._watch = None
            compute_s = time.monotonic() - start
            self._last_compute_s[batch.model_id] = compute_s
        self._finish(messages, batch, compute_s, started_wall, accepted)

    def _decode(self, p: Pending, loaded: Any) -> Message:
        kwargs = p.req.kwargs
        wanted = None
        if isinstance(kwargs, dict) and kwargs.get("outputs") is not None:
            try:
                wanted = decode_output_names(kwargs["outputs"])
                loaded.runtime.check_outputs(loaded, wanted)
            except MeshError as exc:  # the request fails alone, before batching
                return Message(p, [Unit()], error=_detached(exc))
        if isinstance(kwargs, dict) and isinstance(kwargs.get("items"), list) and kwargs["items"]:
            units = self._stacked_units(kwargs["items"], loaded)
            if units is None:
                units = [self._unit(raw, loaded) for raw in kwargs["items"]]
            for u in units:
                u.wanted = wanted
            return Message(p, units, many=True)
        if isinstance(kwargs, dict) and "inputs" in kwargs:
            unit = self._unit(kwargs["inputs"], loaded)
            unit.wanted = wanted
            return Message(p, [unit])
        return Message(
            p, [Unit()],
            error=InvalidInput("mesh.infer needs 'inputs' (KServe V2 tensors) or a non-empty 'items' list"),
        )

    @staticmethod
    def _unit(raw: Any, loaded: Any) -> Unit:
        u = Unit()
        try:
            u.inputs = decode_inputs(raw)
            loaded.runtime.check_inputs(loaded, u.inputs)
            sig = loaded.signature
            if sig is not None and len(sig) == 1 and len(u.inputs) == 1:
                # a one-input model takes its input by position whatever the request named
                # it; renaming lets differently named requests share a batch
                u.inputs = {sig[0].name: next(iter(u.inputs.values()))}
            u.rows = _rows(u.inputs)
        except MeshError as exc:
            u.error = _detached(exc)
        except Exception as exc:  # a malformed request must never take the batch down
            u.error = InvalidInput(f"{type(exc).__name__}: {exc}")
        return u

    @staticmethod
    def _stacked_units(raws: list, loaded: Any) -> list[Unit] | None:
        """A micro-batch's items decoded and checked at once when they are alike
        (`decode_stacked`); None: decode them one by one, so a bad one fails alone."""
        stacked = decode_stacked(raws)
        if stacked is None:
            return None
        name, arr, rows = stacked
        try:
            loaded.runtime.check_inputs(loaded, {name: arr})
        except Exception:  # the one-by-one path reports it for each item
            return None
        sig = loaded.signature
        if sig is not None and len(sig) == 1:
            name = sig[0].name  # as `_unit` renames a lone input
        units, start = [], 0
        for n in rows:
            units.append(Unit(inputs={name: arr[start : start + n]}, rows=n))
            start += n
        return units

    def _predict(self, runtime: Any, model: Any, group: list[Unit], watch: _Watch | None = None) -> None:
        """Predict `group` as one batch; on an exception, bisect to isolate the culprits."""
        try:
            names = list(group[0].inputs)
            if any(list(u.inputs) != names for u in group):
                raise InvalidInput("requests in one batch name different inputs")
            feed = (
                group[0].inputs if len(group) == 1
                else {n: np.concatenate([u.inputs[n] for u in group], axis=0) for n in names}
            )
            wanted = group[0].wanted
            outputs = (_call_predict(runtime, model, feed, wanted) if watch is None
                       else self._watched(runtime, model, feed, watch, wanted))  # fmt: skip
            total = sum(u.rows for u in group)
            for name, arr in outputs.items():
                if np.ndim(arr) == 0 or len(arr) != total:
                    raise InferenceError(
                        f"runtime returned output {name!r} of shape {np.shape(arr)} for a batch of {total} rows"
                    )
            if len(group) == 1:
                group[0].outputs = {name: np.asarray(arr) for name, arr in outputs.items()}
                return
            arrays = {name: np.asarray(arr) for name, arr in outputs.items()}
            start = 0
            for u in group:  # slices, as np.split's (which cost 5x more: 32 us for 32 rows)
                stop = start + u.rows
                u.outputs = {name: arr[start:stop] for name, arr in arrays.items()}
                start = stop
        except Exception as exc:
            if len(group) > 1:
                mid = len(group) // 2
                self._predict(runtime, model, group[:mid], watch)
                self._predict(runtime, model, group[mid:], watch)
                return
            u = group[0]
            u.tb = traceback.format_exc()
            u.error = _detached(exc) if isinstance(exc, MeshError) else InferenceError(f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ predict watchdog
    def _watched(self, runtime: Any, model: Any, feed: dict[str, np.ndarray], watch: _Watch,
                 wanted: tuple[str, ...] | None = None) -> Any:  # fmt: skip
        """One predict call under the watchdog: armed with its deadline, disarmed after; a call
        the watchdog gave up on meanwhile ends this thread (`_Abandoned`)."""
        watch.deadline = time.monotonic() + watch.timeout_s
        try:
            outputs = _call_predict(runtime, model, feed, wanted)
        except BaseException:
            if self._disarm(watch):
                raise _Abandoned() from None
            raise
        if self._disarm(watch):
            raise _Abandoned()
        return outputs

    def _disarm(self, watch: _Watch) -> bool:
        """The predict call returned: True if the watchdog fired on it first."""
        with self._watch_lock:
            watch.deadline = 0.0
            return watch.fired

    def _watch_predicts(self) -> None:
        """The watchdog thread: sleeps until the running predict call's deadline (at most
        WATCHDOG_IDLE_S when none runs), then gives up on it if it still runs. One wake-up per
        timeout while batches run, not one per batch."""
        name_os_thread()
        stop = self._stop_requested
        while not stop.is_set():
            watch = self._watch
            deadline = watch.deadline if watch is not None else 0.0
            now = time.monotonic()
            if not deadline or now < deadline:
                stop.wait(deadline - now if deadline else WATCHDOG_IDLE_S)
                continue
            with self._watch_lock:
                fire = watch.deadline == deadline and not watch.fired
                if fire:
                    watch.fired = True
            if fire:
                try:
                    self._hung(watch)
                except Exception:  # the watchdog must outlive any one failure
                    log.exception("handling the hung predict of %s failed", watch.batch.model_id)

    def _hung(self, watch: _Watch) -> None:
        """A predict call ran past its timeout: serve on a new thread, answer the batch, take
        the copy out of service; too many abandoned threads: exit for the supervisor."""
        model_id = watch.batch.model_id
        if self._watch is watch:
            self._watch = None
        stuck = watch.thread
        self._spawn()  # first: the other models' batches are taken again at once
        self._stuck = [t for t in self._stuck if t.is_alive()] + [stuck]
        message = (f"the predict of {model_id!r} ran past its timeout of {watch.timeout_s:g}s "
                   f"(MESH_PREDICT_TIMEOUT_S, or the model's batching.predict_timeout_s); "
                   f"the copy on this worker was taken out of service")  # fmt: skip
        log.error("%s; its inference thread %s is abandoned (%d abandoned and still running)",
                  message, stuck.name, len(self._stuck))  # fmt: skip
        error = PredictTimeout(message)
        for m in watch.messages:
            # items predicted in an earlier call of the batch keep their outputs
            if m.error is None and any(u.error is None and u.outputs is None for u in m.units):
                m.error = error
        try:
            self._finish(watch.messages, watch.batch, time.monotonic() - watch.started,
                         watch.started_wall, watch.accepted)  # fmt: skip
        except Exception:
            log.exception("could not answer the hung batch of %s; its requests stay unacked", model_id)
        self.manager.take_out(model_id, watch.entry, message)
        if len(self._stuck) > MAX_STUCK_PREDICTS:
            log.critical("%d predicts hang in this worker (more than %d): exiting for the supervisor",
                         len(self._stuck), MAX_STUCK_PREDICTS)  # fmt: skip
            os.kill(os.getpid(), signal.SIGTERM)

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"mesh-inference-{len(self._stuck) + 1}", daemon=True)
        self._serving = thread
        thread.start()

    # ------------------------------------------------------------------ results
    def _finish(self, messages: list[Message], batch: Batch, compute_s: float, started_wall: float = 0.0,
                accepted: tuple | None = None) -> None:  # fmt: skip
        """Encode every result here, then hand them to the results thread (`_store`)."""
        backend = self.backend()  # thread-local instance: this thread's own connection
        date_done = backend.app.now().isoformat()  # Celery's stamp, once for the batch
        results = []
        for m in messages:  # one by one: a message that cannot be answered fails alone (issue 21)
            result = self._encode(backend, m, batch.model_id, date_done)
            if result is not None:
                results.append(result)
        wait_ms = (time.monotonic() - compute_s - min(m.pending.arrived for m in messages)) * 1000.0
        self._results_room.acquire()
        if len(messages) == 1 and len(messages[0].units) == 1 and self.batcher.empty():
            # a lone request and no next batch to predict meanwhile: storing here spares the
            # hand-over to the results thread (a thread wake-up, a good part of a lone request's
            # latency). Not a micro-batch (`infer_many`): its larger pipeline kept this thread
            # from the next message, which usually arrives meanwhile (stored here, 2 producers
            # of 32-item messages got 5-8 % fewer items/s: docs/benchmarks.md)
            self._store(results, messages, batch, compute_s, started_wall, wait_ms, accepted)
            return
        try:
            self._results.submit(self._store, results, messages, batch, compute_s, started_wall, wait_ms, accepted)
        except RuntimeError:  # shut down under us: nothing stored, nothing acked (redelivered)
            self._results_room.release()
            raise

    def _encode(
        self, backend: Any, m: Message, model_id: str, date_done: str
    ) -> tuple[str, bytes, str | None] | None:
        """A message's result record: (key, value, reply list or None). A result that cannot
        be encoded is replaced by an INTERNAL failure; a message that cannot be answered at
        all (its id cannot be a Redis key) gets None: it is acked without an answer, logged
        and counted, and its batch-mates are answered as usual. Before, one such message
        failed the whole batch's pipeline, which stayed unacked for a visibility timeout."""
        req = m.pending.req
        try:
            key = backend.get_key_for_task(req.id)
            if isinstance(key, str):
                key.encode("utf-8")  # what redis-py does with it, strictly: a lone surrogate raises
        except Exception as exc:
            log.error("cannot answer request %r of %s: its id is not a usable key (%s); acked unanswered",
                      req.id, model_id, type(exc).__name__)  # fmt: skip
            self.metrics.reject("unanswerable")
            return None
        reply_to = req.reply_to if self.keys.is_reply_list(req.reply_to) else None
        try:
            result = _success(model_id, m)
            value = None if result is None else success_record(backend, result, req.id, req, date_done)
            if value is None:
                meta = _result_meta(backend, req, m, result)
                meta["task_id"] = req.id
                value = backend.encode(meta)
            return key, value, reply_to
        except Exception as exc:
            why = type(exc).__name__
            log.error("cannot encode the result of request %r of %s: %s: %s", req.id, model_id,
                      why, str(exc)[:200])  # fmt: skip
        try:
            m.error, m.tb = InferenceError(f"the result could not be encoded: {why}"), None
            meta = _result_meta(backend, req, m, None)
            meta["task_id"] = req.id
            return key, backend.encode(meta), reply_to
        except Exception as exc2:
            log.error("cannot answer request %r of %s: %s; acked unanswered", req.id, model_id, type(exc2).__name__)
            self.metrics.reject("unanswerable")
            return None

    def _store(self, results: list[tuple[str, bytes, str | None]], messages: list[Message], batch: Batch,
               compute_s: float, started_wall: float, wait_ms: float, accepted: tuple | None = None) -> None:  # fmt: skip
        """Results thread: store a batch's results in one pipeline (SET for late readers,
        PUBLISH for Celery's waiting ones, a push to the producer's reply list for mesh
        producers) that also acks them in Redis when the broker is the same server, then
        finish the acks and send events on the consumer thread."""
        model_id = batch.model_id
        try:
            backend = self.backend()  # the results thread's own instance and connection
            expires = self.result_expires_s
            with PackedPipeline(backend.client) as pipe:  # redis-py's Pipeline cost more than the round trip
                for key, value, _ in results:
                    pipe.set(key, value, ex=expires)
                    pipe.publish(key, value)
                # after the results: a message is never acked without its result stored
                acked = ack_in(pipe, [m.pending.req._message for m in messages], redis_server(backend.client))
                stored = len(pipe)
                lists: dict[str, list[bytes]] = {}
                for _, value, reply_to in results:
                    if reply_to is not None:
                        lists.setdefault(reply_to, []).append(value)
                for reply_to, values in lists.items():  # one push per producer and batch
                    push_reply(pipe, reply_to, *values)
                outcomes = pipe.execute()
            for outcome in outcomes[:stored]:
                if isinstance(outcome, Exception):
                    raise outcome
            check_replies(outcomes[stored:])
        except Exception:  # results cannot be stored (Redis away): leave them unacked
            log.exception("could not store the results of %d requests of %s; they stay unacked "
                          "and are redelivered", len(messages), model_id)  # fmt: skip
            return
        finally:
            self._results_room.release()
        failures = sum(1 for m in messages if m.failed)
        self.stats.add(model_id, len(messages), failures)
        self._observe(messages, model_id, compute_s, started_wall)
        self.consumer.call_soon(
            _complete_all, messages, acked, compute_s, self.consumer.event_dispatcher(), accepted,
            {"model": model_id, "size": sum(len(m.units) for m in messages),
             "messages": len(messages), "reason": batch.reason, "failed": failures,
             "queue_wait_ms": round(wait_ms, 3), "compute_ms": round(compute_s * 1000.0, 3)},
        )


    def _observe(self, messages: list[Message], model_id: str, compute_s: float, started_wall: float) -> None:
        """A batch's metrics, on the model's series looked up once (`WorkerMetrics.batch_series`)."""
        mx = self.metrics
        series = mx.batch_series(model_id)
        failed: dict[str, int] = {}
        queued: list[float] = []
        answered = units = 0
        for m in messages:
            error, _ = m.failure
            if error is not None:
                outcome = outcome_of(error)
                failed[outcome] = failed.get(outcome, 0) + 1
                continue
            answered += 1
            sent = _sent_at(m.pending.req)
            if sent is not None:
                queued.append(max(0.0, started_wall - sent))
            units += len(m.units)
        if answered:
            series.success.inc(answered)
        for outcome, n in failed.items():
            mx.requests.labels(model_id, outcome).inc(n)
        for seconds in queued:
            series.queue_seconds.observe(seconds)
        for _ in range(answered):  # per request: the compute time each one waited on
            series.compute_seconds.observe(compute_s)
        if units:
            series.items.inc(units)
            series.batch_size.observe(units)
            mx.cache_hits.inc(len(messages))


def _sent_at(req: Any) -> float | None:
    try:
        return float(req._request_dict.get(SENT_AT_HEADER))
    except (TypeError, ValueError):
        return None


def _error_entry(exc: BaseException) -> dict:
    return {
        "code": getattr(exc, "code", "INTERNAL"),
        "type": type(exc).__name__,
        "message": str(exc),
    }


def _success(model_id: str, m: Message) -> dict | None:
    """A message's V2 response, or None when it failed as a whole."""
    if m.failed:
        return None
    req = m.pending.req
    if m.many:
        return {
            "model_name": model_id,
            "id": req.id,
            "results": [
                {"error": _error_entry(u.error)} if u.error is not None
                else {"outputs": encode_outputs(u.outputs)}
                for u in m.units
            ],
        }
    return {"model_name": model_id, "id": req.id, "outputs": encode_outputs(m.units[0].outputs)}


def _result_meta(backend: Any, req: Any, m: Message, result: dict | None) -> dict:
    """Celery's meta for a message: its SUCCESS with `result` (`_success`), or its FAILURE."""
    if result is None:
        error, tb = m.failure
        return backend._get_result_meta(backend.prepare_exception(error), states.FAILURE, tb, req)
    return backend._get_result_meta(result, states.SUCCESS, None, req)


def _by_outputs(units: list[Unit]) -> list[list[Unit]]:
    """Units grouped by the outputs they asked for, each group in arrival order."""
    groups: dict[tuple[str, ...] | None, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.wanted, []).append(u)
    return list(groups.values())


def _call_predict(runtime: Any, model: Any, feed: dict[str, np.ndarray], wanted: tuple[str, ...] | None) -> Any:
    # a request naming no outputs calls predict as runtimes written before outputs existed expect
    return runtime.predict(model, feed) if wanted is None else runtime.predict(model, feed, wanted)


def _detached(exc: BaseException) -> BaseException:
    """`exc` (and the exceptions it chains) without tracebacks, before a Unit keeps it.

    A traceback holds its frames, and each frame its caller and its locals: the batch, its
    other requests and the loaded model. Kept on a Unit, that is a reference cycle only the
    cyclic GC frees, and a worker's GC reaches long-lived objects rarely (GC_THRESHOLDS in
    workers/worker.py): every malformed request pinned the model it was sent to, evicted
    or not, until a full collection. Measured in the soak (`scripts/bench soak`, 1 % bad
    requests, models churning): up to 60 evicted SVC/MLP models alive in one worker and its
    RSS 40-70 % above the other's. The text of the traceback, where one is wanted, is in
    `Unit.tb`."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [exc]
    while chain:
        e = chain.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        chain += (e.__cause__, e.__context__)
    return exc


def _rows(inputs: dict[str, np.ndarray]) -> int:
    rows = {int(a.shape[0]) for a in inputs.values()}
    if len(rows) != 1:
        raise InvalidInput(f"inputs disagree on the batch dimension: {sorted(rows)}")
    return rows.pop()


# ---------------------------------------------------------------------- consumer-thread callbacks
def _accept_all(items: list[Pending], pid: int, started: float) -> None:
    for p in items:
        p.req.on_accepted(pid, started)  # task-started; acks_late so no ack here


def _revoke_all(items: list[Pending]) -> None:
    for p in items:
        p.req.revoked()
        worker_state.task_ready(p.req)


def _complete_all(messages: list[Message], acked: list, runtime_s: float, dispatcher: Any, accepted: tuple | None,
                  batch_event: dict) -> None:  # fmt: skip
    if accepted is not None:
        _accept_all(*accepted)
    try:
        forget_acked(acked)  # acked in Redis by the results pipeline
        ack_many([m.pending.req._message for m in messages])  # the others (none on one Redis)
    except Exception:  # connection trouble: unacked messages are redelivered (at-least-once)
        log.exception("acking a batch of %d failed; they will be redelivered", len(messages))
    for m in messages:
        req = m.pending.req
        worker_state.task_ready(req, successful=not m.failed)
        req.acknowledged = True
        try:  # one message's event must not keep its batch-mates' from being sent
            if not m.failed:
                req.send_event("task-succeeded", result=_summary(m), runtime=runtime_s)
            else:
                error, tb = m.failure
                req.send_event("task-failed", exception=saferepr(error), traceback=tb or "")
        except Exception as exc:
            log.error("could not send the task event of %r: %s: %s", req.id, type(exc).__name__, str(exc)[:200])
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.send("mesh-batch", **batch_event)


def _summary(m: Message) -> str:
    """A short result for Flower: the first values of each output (or the item count)."""
    if m.many:
        failed = sum(1 for u in m.units if u.error is not None)
        return f"{len(m.units)} items, {failed} failed"
    outputs = {k: np.asarray(v) for k, v in (m.units[0].outputs or {}).items()}
    firsts = {k: v.ravel()[:8].tolist() for k, v in outputs.items()}
    if all(v.dtype.kind in "biuf" for v in outputs.values()) and all(type(k) is str for k in firsts):
        # numbers only: the builtin repr, a tenth of saferepr's cost (a twentieth of a batched
        # request's worker CPU went to saferepr here), cut at saferepr's 256 characters
        text = repr(firsts)
        return text if len(text) <= 256 else text[:253] + "..."
    return saferepr(firsts, maxlen=256)  # strings, objects: saferepr bounds each part
