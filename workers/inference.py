"""The inference thread: take the oldest ready batch, predict, store every result, then ack.

Per batch: decode and check each request's tensors (a bad one fails alone, before batching),
concatenate along the batch dimension, predict once, split the outputs back per request,
store all results in one Redis pipeline, and only then (on the consumer thread) ack each
message and send its task events. A predict that raises is bisected until the guilty
requests are found; their batch-mates still succeed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import states
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from mesh.errors import InferenceError, InvalidInput, MeshError
from mesh.tensors import decode_inputs, encode_outputs

from .batcher import Batch, Pending

if TYPE_CHECKING:
    from .manager import Entry
    from .worker import MeshWorker

log = logging.getLogger("mesh.worker.inference")


@dataclass
class Outcome:
    item: Pending
    inputs: dict[str, np.ndarray] | None = None
    rows: int = 0
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    tb: str | None = None


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
    def __init__(self, host: MeshWorker) -> None:
        super().__init__(name="mesh-inference", daemon=True)
        self.host = host
        self.stats = Stats()
        self._stop_requested = threading.Event()
        self.pid = os.getpid()

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        batcher = self.host.batcher
        while not self._stop_requested.is_set():
            batch = batcher.take(timeout=0.5)
            if batch is None:
                continue
            try:
                self.process(batch)
            except Exception:  # the loop must survive anything a batch throws at it
                log.exception("batch for %s failed unexpectedly; failing its requests", batch.model_id)
                self._finish([Outcome(p, error=InferenceError("internal error in the batch loop")) for p in batch.items], batch, 0.0)

    # ------------------------------------------------------------------ one batch
    def process(self, batch: Batch) -> None:
        items = self._drop_expired(batch.items)
        if not items:
            return
        if batch.error is not None:
            self._finish([Outcome(p, error=batch.error) for p in items], batch, 0.0)
            return
        entry = self.host.manager.acquire(batch.model_id)
        if entry is None:  # evicted between buffering and now: another copy will answer
            self.host.requeue(items)
            return
        try:
            self._run(entry, items, batch)
        finally:
            self.host.manager.release(entry)

    def _drop_expired(self, items: list[Pending]) -> list[Pending]:
        now = time.time()
        live, expired = [], []
        for p in items:
            exp = p.req.expires
            (expired if exp is not None and exp.timestamp() <= now else live).append(p)
        if expired:
            # Request.revoked() marks REVOKED in the backend, acks and sends task-revoked;
            # it touches the channel, so it runs on the consumer thread.
            self.host.call_soon(_revoke_all, expired)
        return live

    def _run(self, entry: Entry, items: list[Pending], batch: Batch) -> None:
        loaded = entry.loaded
        runtime = loaded.runtime
        outcomes = [Outcome(p) for p in items]
        sig = loaded.signature
        single_input = sig[0].name if sig is not None and len(sig) == 1 else None
        for o in outcomes:
            try:
                kwargs = o.item.req.kwargs
                if not isinstance(kwargs, dict) or "inputs" not in kwargs:
                    raise InvalidInput("mesh.infer needs a keyword argument 'inputs' (KServe V2 tensors)")
                o.inputs = decode_inputs(kwargs["inputs"])
                runtime.check_inputs(loaded, o.inputs)
                if single_input is not None and len(o.inputs) == 1:
                    # a one-input model takes its input by position whatever the request
                    # named it; renaming lets differently named requests share a batch
                    o.inputs = {single_input: next(iter(o.inputs.values()))}
                o.rows = _rows(o.inputs)
            except MeshError as exc:
                o.error = exc
            except Exception as exc:  # a malformed request must never take the batch down
                o.error = InvalidInput(f"{type(exc).__name__}: {exc}")
        good = [o for o in outcomes if o.error is None]
        if good:
            start = time.monotonic()
            self.host.call_soon(_accept_all, [o.item for o in good], self.pid, start)
            self._predict(runtime, loaded.model, good)
            compute_s = time.monotonic() - start
        else:
            compute_s = 0.0
        self._finish(outcomes, batch, compute_s)

    def _predict(self, runtime: Any, model: Any, group: list[Outcome]) -> None:
        """Predict `group` as one batch; on an exception, bisect to isolate the culprits."""
        try:
            names = list(group[0].inputs)
            if any(list(o.inputs) != names for o in group):
                raise InvalidInput("requests in one batch name different inputs")
            feed = {n: np.concatenate([o.inputs[n] for o in group], axis=0) for n in names}
            outputs = runtime.predict(model, feed)
            total = sum(o.rows for o in group)
            for name, arr in outputs.items():
                if np.ndim(arr) == 0 or len(arr) != total:
                    raise InferenceError(
                        f"runtime returned output {name!r} with {np.shape(arr)} rows for a batch of {total}"
                    )
            bounds = np.cumsum([o.rows for o in group])[:-1]
            split = {name: np.split(np.asarray(arr), bounds) for name, arr in outputs.items()}
            for i, o in enumerate(group):
                o.outputs = {name: parts[i] for name, parts in split.items()}
        except Exception as exc:
            if len(group) > 1:
                mid = len(group) // 2
                self._predict(runtime, model, group[:mid])
                self._predict(runtime, model, group[mid:])
                return
            o = group[0]
            o.error = exc if isinstance(exc, MeshError) else InferenceError(f"{type(exc).__name__}: {exc}")
            o.tb = traceback.format_exc()

    # ------------------------------------------------------------------ results
    def _finish(self, outcomes: list[Outcome], batch: Batch, compute_s: float) -> None:
        """Store every result in one pipeline, then ack and send events on the consumer thread."""
        backend = self.host.app.backend  # thread-local instance: this thread's own connection
        expires = self.host.settings.result_expires_s
        model_id = batch.model_id
        with backend.client.pipeline(transaction=False) as pipe:
            for o in outcomes:
                req = o.item.req
                if o.error is None:
                    result = {
                        "model_name": model_id,
                        "id": req.id,
                        "outputs": encode_outputs(o.outputs),
                    }
                    meta = backend._get_result_meta(result, states.SUCCESS, None, req)
                else:
                    meta = backend._get_result_meta(
                        backend.prepare_exception(o.error), states.FAILURE, o.tb, req
                    )
                    result = None
                meta["task_id"] = req.id
                key = backend.get_key_for_task(req.id)
                value = backend.encode(meta)
                pipe.set(key, value, ex=expires)
                pipe.publish(key, value)
            pipe.execute()
        failures = sum(1 for o in outcomes if o.error is not None)
        self.stats.add(model_id, len(outcomes), failures)
        now = time.monotonic()
        wait_ms = (now - compute_s - min(o.item.arrived for o in outcomes)) * 1000.0
        self.host.call_soon(
            _complete_all, outcomes, compute_s, self.host.event_dispatcher,
            {"model": model_id, "size": len(outcomes), "reason": batch.reason,
             "failed": failures, "queue_wait_ms": round(wait_ms, 3),
             "compute_ms": round(compute_s * 1000.0, 3)},
        )


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


def _complete_all(outcomes: list[Outcome], runtime_s: float, dispatcher: Any, batch_event: dict) -> None:
    for o in outcomes:
        req = o.item.req
        worker_state.task_ready(req, successful=o.error is None)
        req.acknowledge()
        if o.error is None:
            req.send_event("task-succeeded", result=saferepr(_summary(o.outputs), maxlen=256), runtime=runtime_s)
        else:
            req.send_event("task-failed", exception=saferepr(o.error), traceback=o.tb or "")
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.send("mesh-batch", **batch_event)


def _summary(outputs: dict[str, np.ndarray] | None) -> dict:
    return {k: np.asarray(v).ravel()[:8].tolist() for k, v in (outputs or {}).items()}
