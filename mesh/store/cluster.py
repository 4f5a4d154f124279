"""The scheduler's view of the cluster in Redis: bulk reads of everything the planner looks at,
and the writes that carry out its actions (guarded so they never undo a newer change).

mesh/control/rebalance.py orchestrates a run with it; the scheduler talks to Redis only through
the store (this module and mesh/store/vmodels.py, for the run's vmodel duty).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from mesh.models import CopyInfo, CopyState, FailedCopy, ModelRecord, WorkerState
from mesh.policy.planner import (
    ClusterState,
    CopyView,
    FailureView,
    PastAction,
    RegisteredModel,
    RegistryCopy,
    WorkerView,
)
from mesh.policy.precedence import copies_bounds
from mesh.protocol.keys import Keys
from mesh.store.state import StateStore

CHUNK = 1000  # commands per pipeline round trip when reading per-model keys


# Delete a hash field only if it still holds exactly the value the planner saw; with ARGV[3]
# set, only while that worker has no heartbeat (a restarted worker keeps its new records).
_HDEL_IF_LUA = """
if ARGV[3] ~= '' and redis.call('EXISTS', ARGV[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# Forget a listed worker only while it has no heartbeat (one that came back keeps its place).
_FORGET_WORKER_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# Record the copy as LOADING before the command leaves, so producers route to it instead of
# claiming a cold load of their own; never over an existing record, never for a gone model.
_MARK_LOADING_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
"""


def _chunks(items: list[str], n: int = CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class ClusterStore:
    """Bulk reads of everything the planner looks at, in a bounded number of round trips, and
    the scheduler's writes: its leader lock, the registry bookkeeping its actions do, its
    history of sent actions and its last report."""

    # Parsed registry records by their raw JSON: records rarely change, and parsing 100,000 of
    # them with pydantic on every run would dominate it. Shared by the runs of one process.
    _record_cache: dict[bytes, tuple[int, int | None, int | None]] = {}

    def __init__(self, store: StateStore, priority_steps: list[int], usage_decay_s: float) -> None:
        self.r = store.r
        self.keys: Keys = store.keys
        self.store = store
        self.priority_steps = priority_steps
        self.decay_s = usage_decay_s
        self._hdel_if = self.r.register_script(_HDEL_IF_LUA)
        self._forget = self.r.register_script(_FORGET_WORKER_LUA)
        self._mark_loading = self.r.register_script(_MARK_LOADING_LUA)

    # ------------------------------------------------------------------ reading
    def workers(self) -> tuple[list[WorkerView], dict[str, WorkerState]]:
        names = sorted(n.decode() for n in self.r.smembers(self.keys.workers))
        views: list[WorkerView] = []
        states: dict[str, WorkerState] = {}
        for chunk in _chunks(names, 500):
            for name, raw in zip(chunk, self.r.mget([self.keys.worker(n) for n in chunk])):
                if raw is None:
                    views.append(WorkerView(name=name, capacity=0, alive=False))
                    continue
                st = WorkerState.model_validate_json(raw)
                states[name] = st
                views.append(
                    WorkerView(
                        name=name,
                        capacity=st.capacity_bytes,
                        used=st.used_bytes,
                        models={
                            m.model_id: CopyView(m.model_id, m.size_bytes, m.last_used, m.loaded_at, m.request_rate)
                            for m in st.models
                        },
                        loading=set(st.loading),
                        shutting_down=st.shutting_down,
                        rate=st.request_rate,
                        started_at=st.started_at,
                    )
                )
        return views, states

    def records(self) -> dict[str, tuple[int, int | None, int | None]]:
        """model_id -> (size hint, min_copies, max_copies)."""
        cache = self._record_cache
        if len(cache) > 400_000:
            cache.clear()
        out: dict[str, tuple[int, int | None, int | None]] = {}
        for model_id, raw in self.r.hgetall(self.keys.models).items():
            parsed = cache.get(raw)
            if parsed is None:
                rec = ModelRecord.model_validate_json(raw)
                parsed = (rec.size_bytes or rec.info.size_bytes or 0, *copies_bounds(rec))  # api > manifest
                cache[raw] = parsed
            out[model_id.decode()] = parsed
        return out

    def per_model(self, ids: list[str]) -> dict[str, tuple[dict, dict, int]]:
        """model_id -> (raw copy records, raw failure records, queue depth)."""
        k, steps = self.keys, self.priority_steps
        out: dict[str, tuple[dict, dict, int]] = {}
        for chunk in _chunks(ids):
            with self.r.pipeline(transaction=False) as p:
                for m in chunk:
                    p.hgetall(k.copies(m))
                    p.hgetall(k.failures(m))
                    for key in k.queue_list_keys(k.model_queue(m), steps):
                        p.llen(key)
                flat = p.execute()
            step = 2 + len(steps)
            for i, m in enumerate(chunk):
                row = flat[i * step : (i + 1) * step]
                out[m] = (row[0], row[1], sum(row[2:]))
        return out

    def usage(self) -> dict[str, tuple[float, float, float]]:
        """model_id -> (last_used, score, time of the score)."""
        out = {}
        for model_id, raw in self.r.hgetall(self.keys.usage).items():
            try:
                last_used, score, t = json.loads(raw)
                out[model_id.decode()] = (float(last_used), float(score), float(t))
            except (ValueError, TypeError):
                continue  # a malformed entry is only a lost hint
        return out

    def history(self, since: float) -> list[PastAction]:
        out = []
        for raw in self.r.zrangebyscore(self.keys.rebalance_history, since, "+inf"):
            try:
                d = json.loads(raw)
                out.append(PastAction(d["time"], d["op"], d["model_id"], d["worker"], d.get("reason", "")))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def read(self, now: float, history_s: float, interval_s: float) -> ClusterState:
        workers, _ = self.workers()
        records = self.records()
        ids = sorted(records)
        rows = self.per_model(ids)
        usage = self.usage()
        self._update_usage(workers, records, usage, now, interval_s)
        decay = self.decay_s
        models = []
        for model_id in ids:
            size, min_copies, max_copies = records[model_id]
            raw_copies, raw_failures, depth = rows[model_id]
            last_used, score, t = usage.get(model_id, (0.0, 0.0, now))
            models.append(
                RegisteredModel(
                    model_id=model_id,
                    size=size,
                    min_copies=min_copies,
                    max_copies=max_copies,
                    copies=_copies(raw_copies),
                    failures=_failures(raw_failures),
                    queue_depth=depth,
                    last_used=last_used,
                    score=score * math.exp(-max(0.0, now - t) / decay),
                )
            )
        retiring = {m.decode() for m in self.r.hkeys(self.keys.draining)}
        return ClusterState(
            workers=workers, models=models, history=self.history(now - history_s), retiring=retiring
        )

    def _update_usage(
        self,
        workers: list[WorkerView],
        records: dict[str, Any],
        usage: dict[str, tuple[float, float, float]],
        now: float,
        interval_s: float,
    ) -> None:
        """Fold the heartbeats into each model's usage: its newest use, and an exponentially
        decayed request rate (time constant `usage_decay_s`) that survives its copies, so the
        planner knows what a model is worth after it was evicted (cortexlabs/cortex#619: the
        top N)."""
        rates: dict[str, float] = {}
        used: dict[str, float] = {}
        for w in workers:
            for model_id, c in w.models.items():
                rates[model_id] = rates.get(model_id, 0.0) + c.rate
                if c.last_used > used.get(model_id, 0.0):
                    used[model_id] = c.last_used
        updates: dict[str, str] = {}
        for model_id, rate in rates.items():
            if model_id not in records:
                continue
            old = usage.get(model_id)
            if old is not None and rate == 0.0 and used.get(model_id, 0.0) <= old[0]:
                continue  # unchanged: the stored score decays when it is read
            last_used, score, t = old if old is not None else (0.0, 0.0, now - interval_s)
            keep = math.exp(-max(0.0, now - t) / self.decay_s)
            score = score * keep + rate * (1.0 - keep)
            last_used = max(last_used, used.get(model_id, 0.0))
            usage[model_id] = (last_used, score, now)
            updates[model_id] = json.dumps([round(last_used, 3), score, round(now, 3)])
        gone = [m for m in usage if m not in records]
        for m in gone:
            del usage[m]
        with self.r.pipeline(transaction=False) as p:
            items = list(updates.items())
            for i in range(0, len(items), CHUNK):
                p.hset(self.keys.usage, mapping=dict(items[i : i + CHUNK]))
            for chunk in _chunks(gone):
                p.hdel(self.keys.usage, *chunk)
            p.execute()

    # ------------------------------------------------------------------ the leader lock
    def take_lock(self, token: str, ttl_ms: int) -> bool:
        """Hold the scheduler's leader lock as `token` for `ttl_ms`, unless another run holds it."""
        return bool(self.r.set(self.keys.rebalance_lock, token, nx=True, px=ttl_ms))

    def release_lock(self, token: str) -> None:
        self.store.release_lock(self.keys.rebalance_lock, token)

    # ------------------------------------------------------------------ acting
    def forget_worker(self, worker: str) -> None:
        self._forget(keys=[self.keys.workers, self.keys.worker(worker)], args=[worker])

    def drop_copy(self, model_id: str, worker: str, raw: str, *, only_if_dead: bool) -> None:
        """Delete the copy record the planner saw as `raw`; with `only_if_dead`, only while its
        worker has no heartbeat."""
        guard = self.keys.worker(worker) if only_if_dead else ""
        self._hdel_if(keys=[self.keys.copies(model_id)], args=[worker, raw, guard])

    def clear_failure(self, model_id: str, worker: str, raw: str) -> None:
        """Delete the failure record the planner saw as `raw`."""
        self._hdel_if(keys=[self.keys.failures(model_id)], args=[worker, raw, ""])

    def mark_loading(self, model_id: str, worker: str, now: float) -> bool:
        """Record `worker`'s copy as LOADING and queue it on the worker's line of loads; False
        (nothing written) when the model was unregistered meanwhile or a copy record appeared."""
        record = CopyInfo(worker=worker, state=CopyState.LOADING, since=now).model_dump_json()
        if not self._mark_loading(keys=[self.keys.models, self.keys.copies(model_id)], args=[model_id, worker, record]):
            return False
        with self.r.pipeline(transaction=False) as p:
            self.store.add_to_load_line(p, worker, model_id, now)
            p.execute()
        return True

    def record_history(self, sent: Iterable[PastAction], now: float, keep_s: float) -> None:
        """Remember the actions this run sent (read back by `history`) and forget those older
        than `keep_s`."""
        history = {_past(a): a.time for a in sent}
        with self.r.pipeline(transaction=False) as p:
            if history:
                p.zadd(self.keys.rebalance_history, history)
            p.zremrangebyscore(self.keys.rebalance_history, "-inf", now - keep_s)
            p.execute()

    def save_report(self, report_json: str) -> None:
        """Keep the last run's report for `mesh status`."""
        self.r.set(self.keys.rebalance_last, report_json)


def _past(a: PastAction) -> str:
    return json.dumps({"time": a.time, "op": a.op, "model_id": a.model_id, "worker": a.worker, "reason": a.reason})


def _copies(raw: dict) -> dict[str, RegistryCopy]:
    out = {}
    for worker, value in raw.items():
        try:
            d = json.loads(value)
            out[worker.decode()] = RegistryCopy(state=d["state"], since=float(d["since"]), raw=value.decode())
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _failures(raw: dict) -> dict[str, FailureView]:
    out = {}
    for worker, value in raw.items():
        try:
            f = FailedCopy.model_validate_json(value)
        except ValueError:
            continue
        out[worker.decode()] = FailureView(time=f.time, error=f.error, raw=value.decode())
    return out


__all__ = ["CHUNK", "ClusterStore"]
