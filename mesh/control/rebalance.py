"""The scheduler's run: read the cluster (mesh/store/cluster.py), ask the pure planner
(mesh/policy/planner.py), carry out its actions.

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

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable

import redis
from celery import Celery
from pydantic import BaseModel

from mesh.control.commands import send_command
from mesh.control.vmodels import advance_all
from mesh.models import Command
from mesh.policy.planner import (
    R_REASSERT,
    ClearFailure,
    DropCopy,
    ForgetWorker,
    Load,
    PastAction,
    PlanAction,
    PlannerSettings,
    Unload,
    plan,
)
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.cluster import ClusterStore
from mesh.store.context import StoreContext
from mesh.store.state import StateStore

log = logging.getLogger("mesh.rebalance")


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


# ----------------------------------------------------------------------------- one run


class Rebalancer:
    """One run: `cluster` reads and writes the state, `app` carries the commands to workers."""

    def __init__(
        self,
        app: Celery,
        cluster: ClusterStore,
        settings: MeshSettings | None = None,
        planner: PlannerSettings | None = None,
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.store = cluster.store
        self.keys = cluster.keys
        self.settings = settings or cluster.store.settings
        self.planner = planner or PlannerSettings.from_settings(self.settings)

    @property
    def history_s(self) -> float:
        return max(self.planner.churn_age_s, self.planner.pending_action_ttl_s) + 1.0

    # --- the leader lock
    def acquire(self) -> str | None:
        token = uuid.uuid4().hex
        ttl_ms = int(self.settings.rebalance_lock_ttl_s * 1000)
        return token if self.cluster.take_lock(token, ttl_ms) else None

    def release(self, token: str) -> None:
        self.cluster.release_lock(token)

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
        cluster = self.cluster.read(now, self.history_s, self.settings.rebalance_interval_s)
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
        report.vmodels = advance_vmodels(self.app, self.store)
        report.duration_s = round(time.time() - started, 4)
        self.cluster.save_report(report.model_dump_json())
        if actions:
            log.info("rebalance: %s", ", ".join(f"{k}={v}" for k, v in sorted(report.counts.items())))
        return report

    def apply(self, actions: Iterable[PlanAction], now: float) -> None:
        """Bookkeeping first, then unloads, then loads (the order `plan` returns)."""
        cluster = self.cluster
        sent: list[PastAction] = []
        for a in actions:
            if isinstance(a, ForgetWorker):
                cluster.forget_worker(a.worker)
            elif isinstance(a, DropCopy):
                # a stale record goes even while its worker lives; any other only once it is dead
                cluster.drop_copy(a.model_id, a.worker, a.raw, only_if_dead=a.reason != "stale")
            elif isinstance(a, ClearFailure):
                cluster.clear_failure(a.model_id, a.worker, a.raw)
            elif isinstance(a, Unload):
                cmd = Command(op="unload", model_id=a.model_id, reason=f"scheduler: {a.reason}")
                send_command(cluster.store, a.worker, cmd)
                sent.append(_past(now, a))
            elif isinstance(a, Load):
                if a.reason != R_REASSERT:
                    if not cluster.mark_loading(a.model_id, a.worker, now):
                        continue  # unregistered meanwhile, or a copy record appeared: nothing to do
                    sent.append(_past(now, a))
                send_command(cluster.store, a.worker, Command(op="load", model_id=a.model_id))
        cluster.record_history(sent, now, self.history_s)


def _past(now: float, a: Load | Unload) -> PastAction:
    return PastAction(time=now, op=a.op, model_id=a.model_id, worker=a.worker, reason=a.reason)


def _label(a: PlanAction) -> str:
    reason = getattr(a, "reason", "")
    return f"{a.op}:{reason}" if reason else a.op


def _describe(a: PlanAction) -> str:
    model = getattr(a, "model_id", "")
    reason = getattr(a, "reason", "")
    target = f"{model} on {a.worker}" if model else a.worker
    return f"{a.op} {target}" + (f" ({reason})" if reason else "")


# ----------------------------------------------------------------------------- vmodels


def advance_vmodels(app: Celery, store: StateStore) -> str:
    """Drive pending vmodel transitions and drains (mesh/control/vmodels.py `advance_all`);
    called once per run under the leader lock. Returns the vmodels that completed, for the report."""
    try:
        completed = advance_all(store, app)
    except Exception as exc:  # a vmodel problem must not stop placement
        log.exception("advancing vmodel transitions failed")
        return f"error: {exc}"
    return str(completed)[:500]


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
    settings = settings or store.settings
    return Rebalancer(app, cluster_store(app, store, settings), settings, planner).run(now)


def cluster_store(app: Celery, store: StateStore, settings: MeshSettings) -> ClusterStore:
    """The scheduler's view of `store`'s cluster, with the app's queue priority steps."""
    priority_steps = list(app.conf.broker_transport_options.get("priority_steps", [0]))
    return ClusterStore(store, priority_steps, settings.usage_decay_s, settings.planner_refresh_runs)


def rebalance_from_app(app: Celery) -> RebalanceReport:
    """The `mesh.rebalance` task body: the store and settings of the app's mesh."""
    # shared: this runs on every beat tick, and one client per URL keeps one connection pool
    ctx = StoreContext.from_app(app, shared=True)
    return rebalance(app, ctx.store, settings=ctx.settings)


def trigger(app: Celery) -> None:
    """Ask for a run now (it goes to the control queue like the beat's)."""
    from mesh.protocol.messages import REBALANCE_TASK

    keys = Keys(app.conf.mesh_prefix)
    app.send_task(REBALANCE_TASK, queue=keys.control_queue, priority=0, ignore_result=True)


__all__ = [
    "RebalanceReport",
    "Rebalancer",
    "advance_vmodels",
    "cluster_store",
    "rebalance",
    "rebalance_from_app",
    "trigger",
]
