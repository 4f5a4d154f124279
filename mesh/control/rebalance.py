"""The scheduler's I/O edge: read the cluster from Redis, ask the planner, send its actions.

One run (`rebalance`) holds a Redis leader lock (`SET <prefix>:rebalance:lock <token> NX PX`,
released by compare-and-delete), so two beats, a duplicate message or a redelivery never run
two rebalances at once; a run that follows another closely does not act twice either, because
the planner remembers what earlier runs sent (`<prefix>:rebalance:history`) until the
heartbeats show it. Every action is idempotent at its destination: a load of a model that is
loaded or loading is ignored by the worker, an unload of an absent model is a no-op, and
registry records are deleted only if they are still exactly what the planner saw.

celery beat sends `mesh.rebalance` (mesh/broker/tasks.py RebalanceTask) to `<prefix>.control` every
`MESH_REBALANCE_INTERVAL_S`; every mesh worker consumes that queue (docs/scheduler.md).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from celery import Celery
from pydantic import BaseModel

from mesh.control.commands import send_command
from mesh.policy.precedence import copies_bounds
from mesh.protocol.keys import Keys
from mesh.models import Command, CopyInfo, CopyState, FailedCopy, ModelRecord, WorkerState
from mesh.policy.planner import (
    Action,
    ClearFailure,
    ClusterState,
    CopyView,
    DropCopy,
    FailureView,
    ForgetWorker,
    Load,
    ModelView,
    PastAction,
    PlannerSettings,
    RegistryCopy,
    R_REASSERT,
    Unload,
    WorkerView,
    plan,
)
from mesh.settings import MeshSettings
from mesh.store.state import StateStore

log = logging.getLogger("mesh.rebalance")

CHUNK = 1000  # commands per pipeline round trip when reading per-model keys

# Release the leader lock only if we still hold it (a run that outlived its lease must not
# delete the next leader's lock).
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Delete a hash field only if it still holds exactly the value the planner saw; with ARGV[3]
# set, only while that worker has no heartbeat (a restarted worker keeps its new records).
_HDEL_IF_LUA = """
if ARGV[3] ~= '' and redis.call('EXISTS', ARGV[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

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


class RebalanceReport(BaseModel):
    """What one run did; the last one is kept in Redis for `mesh status`."""

    ran: bool
    reason: str = ""  # why it did not run
    started_at: float
    duration_s: float = 0.0
    plan_s: float = 0.0
    workers: int = 0
    dead_workers: int = 0
    models: int = 0
    counts: dict[str, int] = {}  # "load:scale-up" -> n
    actions: list[str] = []  # the first few, human readable
    vmodels: str = ""  # what advancing the vmodel transitions said, if anything


def planner_settings(s: MeshSettings) -> PlannerSettings:
    """The planner's knobs from MESH_* settings (docs/scheduler.md lists them)."""
    pending = max(15.0, 2 * s.rebalance_interval_s + s.heartbeat_ttl_s)
    return PlannerSettings(
        scale_up_rps_per_copy=s.scale_up_rps_per_copy,
        scale_up_queue_per_copy=s.scale_up_queue_per_copy,
        scale_down_ratio=s.scale_down_ratio,
        copy_idle_s=s.copy_idle_s,
        model_idle_s=s.model_idle_s,
        churn_age_s=s.churn_age_s,
        pending_action_ttl_s=pending,
        stale_copy_s=max(30.0, 2 * pending),
        failure_expiry_s=s.load_failure_expiry_s,
        max_load_failures=s.max_load_attempts,
        drain_recent_s=s.drain_recent_s,
        proactive=s.proactive_loading,
        proactive_fill_fraction=s.proactive_fill_fraction,
        max_loads_per_tick=s.max_loads_per_tick,
        max_loads_per_worker=s.max_loads_per_worker,
        max_evictions_per_tick=s.max_evictions_per_tick,
        default_model_size=s.default_model_size_bytes,
        default_min_copies=s.default_min_copies,
        default_max_copies=s.default_max_copies,
    )


# ----------------------------------------------------------------------------- reading


def _chunks(items: list[str], n: int = CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class ClusterReader:
    """Bulk reads of everything the planner looks at, in a bounded number of round trips."""

    # Parsed registry records by their raw JSON: records rarely change, and parsing 100,000 of
    # them with pydantic on every run would dominate it. Shared by the runs of one process.
    _record_cache: dict[bytes, tuple[int, int | None, int | None]] = {}

    def __init__(self, store: StateStore, priority_steps: list[int], usage_decay_s: float) -> None:
        self.r = store.r
        self.keys: Keys = store.keys
        self.store = store
        self.priority_steps = priority_steps
        self.decay_s = usage_decay_s

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
                ModelView(
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
        planner knows what a model is worth after it was evicted (seed 002: the top N)."""
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


# ----------------------------------------------------------------------------- acting


class Rebalancer:
    def __init__(
        self,
        app: Celery,
        store: StateStore,
        settings: MeshSettings | None = None,
        planner: PlannerSettings | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.r = store.r
        self.keys = store.keys
        self.settings = settings or store.settings
        self.planner = planner or planner_settings(self.settings)
        self.priority_steps = list(app.conf.broker_transport_options.get("priority_steps", [0]))
        self._release = self.r.register_script(_RELEASE_LUA)
        self._hdel_if = self.r.register_script(_HDEL_IF_LUA)
        self._forget = self.r.register_script(_FORGET_WORKER_LUA)
        self._mark_loading = self.r.register_script(_MARK_LOADING_LUA)

    @property
    def history_s(self) -> float:
        return max(self.planner.churn_age_s, self.planner.pending_action_ttl_s) + 1.0

    # --- the leader lock
    def acquire(self) -> str | None:
        token = uuid.uuid4().hex
        ttl_ms = int(self.settings.rebalance_lock_ttl_s * 1000)
        return token if self.r.set(self.keys.rebalance_lock, token, nx=True, px=ttl_ms) else None

    def release(self, token: str) -> None:
        self._release(keys=[self.keys.rebalance_lock], args=[token])

    # --- one run
    def run(self, now: float | None = None) -> RebalanceReport:
        started = time.time()
        token = self.acquire()
        if token is None:
            log.info("rebalance skipped: another run holds the leader lock")
            return RebalanceReport(ran=False, reason="another run holds the leader lock", started_at=started)
        try:
            return self._run_locked(now if now is not None else time.time(), started)
        finally:
            try:
                self.release(token)
            except redis.RedisError as exc:  # the lease expires by itself
                log.warning("could not release the rebalance lock: %s", exc)

    def _run_locked(self, now: float, started: float) -> RebalanceReport:
        reader = ClusterReader(self.store, self.priority_steps, self.settings.usage_decay_s)
        cluster = reader.read(now, self.history_s, self.settings.rebalance_interval_s)
        t0 = time.perf_counter()
        actions = plan(cluster, self.planner, now)
        plan_s = time.perf_counter() - t0
        self.apply(actions, now)
        report = RebalanceReport(
            ran=True,
            started_at=started,
            plan_s=round(plan_s, 4),
            workers=sum(1 for w in cluster.workers if w.alive),
            dead_workers=sum(1 for w in cluster.workers if not w.alive),
            models=len(cluster.models),
            counts=dict(Counter(_label(a) for a in actions)),
            actions=[_describe(a) for a in actions[:50]],
        )
        report.vmodels = advance_vmodels(self.app, self.store, self.settings)
        report.duration_s = round(time.time() - started, 4)
        self.r.set(self.keys.rebalance_last, report.model_dump_json())
        if actions:
            log.info("rebalance: %s", ", ".join(f"{k}={v}" for k, v in sorted(report.counts.items())))
        return report

    def apply(self, actions: Iterable[Action], now: float) -> None:
        """Bookkeeping first, then unloads, then loads (the order `plan` returns)."""
        k = self.keys
        history: dict[str, float] = {}
        for a in actions:
            if isinstance(a, ForgetWorker):
                self._forget(keys=[k.workers, k.worker(a.worker)], args=[a.worker])
            elif isinstance(a, DropCopy):
                guard = k.worker(a.worker) if a.reason != "stale" else ""
                self._hdel_if(keys=[k.copies(a.model_id)], args=[a.worker, a.raw, guard])
            elif isinstance(a, ClearFailure):
                self._hdel_if(keys=[k.failures(a.model_id)], args=[a.worker, a.raw, ""])
            elif isinstance(a, Unload):
                cmd = Command(op="unload", model_id=a.model_id, reason=f"scheduler: {a.reason}")
                send_command(self.app, k, a.worker, cmd)
                history[_past(now, a)] = now
            elif isinstance(a, Load):
                if a.reason != R_REASSERT:
                    record = CopyInfo(worker=a.worker, state=CopyState.LOADING, since=now).model_dump_json()
                    if not self._mark_loading(keys=[k.models, k.copies(a.model_id)], args=[a.model_id, a.worker, record]):
                        continue  # unregistered meanwhile, or a copy record appeared: nothing to do
                    with self.r.pipeline(transaction=False) as p:
                        self.store.add_to_load_line(p, a.worker, a.model_id, now)
                        p.execute()
                    history[_past(now, a)] = now
                send_command(self.app, k, a.worker, Command(op="load", model_id=a.model_id))
        with self.r.pipeline(transaction=False) as p:
            if history:
                p.zadd(k.rebalance_history, history)
            p.zremrangebyscore(k.rebalance_history, "-inf", now - self.history_s)
            p.execute()


def _past(now: float, a: Load | Unload) -> str:
    return json.dumps({"time": now, "op": a.op, "model_id": a.model_id, "worker": a.worker, "reason": a.reason})


def _label(a: Action) -> str:
    reason = getattr(a, "reason", "")
    return f"{a.op}:{reason}" if reason else a.op


def _describe(a: Action) -> str:
    model = getattr(a, "model_id", "")
    reason = getattr(a, "reason", "")
    target = f"{model} on {a.worker}" if model else a.worker
    return f"{a.op} {target}" + (f" ({reason})" if reason else "")


# ----------------------------------------------------------------------------- vmodels


def advance_vmodels(app: Celery, store: StateStore, settings: MeshSettings) -> str:
    """Drive pending vmodel transitions (mesh/control/vmodels.py `advance_all`), if that module exists.

    Called once per run under the leader lock. Its parameters are matched by name among
    (app, store, settings, keys, redis/r/client, now) so either signature works.
    """
    try:
        from mesh import vmodels  # noqa: PLC0415 - optional until that module lands
    except ImportError:
        return ""
    advance_all = getattr(vmodels, "advance_all", None)
    if advance_all is None:
        return ""
    available = {
        "app": app, "celery_app": app, "store": store, "state": store, "settings": settings,
        "keys": store.keys, "redis": store.r, "r": store.r, "client": store.r, "now": time.time(),
    }  # fmt: skip
    try:
        params = inspect.signature(advance_all).parameters
        kwargs = {name: available[name] for name in params if name in available}
        result = advance_all(**kwargs)
    except Exception as exc:  # a vmodel problem must not stop placement
        log.exception("advancing vmodel transitions failed")
        return f"error: {exc}"
    return "" if result is None else str(result)[:500]


# ----------------------------------------------------------------------------- entry points


def rebalance(
    app: Celery,
    store: StateStore,
    *,
    settings: MeshSettings | None = None,
    planner: PlannerSettings | None = None,
    now: float | None = None,
) -> RebalanceReport:
    """One rebalance run: what the beat-scheduled task does, callable directly (tests, CLI)."""
    return Rebalancer(app, store, settings, planner).run(now)


def rebalance_from_app(app: Celery) -> RebalanceReport:
    """The `mesh.rebalance` task body: the store and settings of the app's mesh."""
    conf = app.conf
    settings = MeshSettings(prefix=conf.mesh_prefix, redis_url=conf.mesh_redis_backend_url)
    client = _client_for(conf.mesh_redis_backend_url)
    return rebalance(app, StateStore(client, Keys(settings.prefix), settings), settings=settings)


_clients: dict[str, redis.Redis] = {}


def _client_for(url: str) -> redis.Redis:
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(url, socket_timeout=30, health_check_interval=25)
    return client


def trigger(app: Celery) -> None:
    """Ask for a run now (it goes to the control queue like the beat's)."""
    from mesh.protocol.messages import REBALANCE_TASK

    keys = Keys(app.conf.mesh_prefix)
    app.send_task(REBALANCE_TASK, queue=keys.control_queue, priority=0, ignore_result=True)


__all__ = [
    "ClusterReader",
    "RebalanceReport",
    "Rebalancer",
    "advance_vmodels",
    "planner_settings",
    "rebalance",
    "rebalance_from_app",
    "trigger",
]
