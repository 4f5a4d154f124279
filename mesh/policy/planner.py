"""The scheduler's planner: one pure function from the cluster's state to a list of actions.

`plan(cluster, settings, now)` decides, for the whole pool, what ModelMesh decides in every pod
(kserve/modelmesh src/main/java/com/ibm/watson/modelmesh/ModelMesh.java, "ModelMesh.java" below:
placement, rate tracking, janitor, reaper, pre-shutdown): where new copies go, how many copies each model gets, which
copies leave when space is needed, what happens to dead and draining workers and to failed
loads. It does no I/O: mesh/store/cluster.py reads Redis into a `ClusterState`, mesh/control/rebalance.py calls `plan` and
sends the actions; mesh/tools/simulator.py runs it over a modelled cluster. docs/scheduler.md states
every rule with the ModelMesh behaviour it follows or the user pain point (a GitHub issue) it
fixes.

It must stay fast at 1,000 workers x 100,000 models (< 1 s per tick on 2 cores), so nothing
here loops over workers x models: models with no copy and no demand take a constant-time path,
placement uses heaps over workers (most free space; oldest evictable copy) with lazy re-keying,
and each worker's eviction candidates are sorted only when that worker is considered. The one
pass over every model (`_Plan._each_model`) is spelled out inline and also gathers each
worker's least valuable quiet copy, which seeds the eviction heap; once a run's evictions are
spent, no need searches for victims any more.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.policy.labels import matches
from mesh.policy.placement import affinity
from mesh.settings import MeshSettings

INF = math.inf

# --------------------------------------------------------------------------- inputs


@dataclass(slots=True)
class CopyView:
    """A model loaded on a worker, as the worker's heartbeat reports it."""

    model_id: str
    size: int
    last_used: float
    loaded_at: float
    rate: float = 0.0  # requests/s answered by this copy


@dataclass(slots=True)
class WorkerView:
    name: str
    capacity: int
    used: int = 0  # includes bytes reserved for loads in progress
    models: dict[str, CopyView] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    shutting_down: bool = False
    alive: bool = True  # False: listed in the worker set but its heartbeat expired
    rate: float = 0.0  # requests/s over all its models
    started_at: float = 0.0  # registry records older than this belong to a previous incarnation
    labels: dict[str, str] = field(default_factory=dict)  # MESH_WORKER_LABELS: its pool(s)


@dataclass(slots=True)
class RegistryCopy:
    """A copy record in the registry (what routing sees), with its raw form for compare-and-delete."""

    state: Literal["LOADING", "LOADED"]
    since: float
    raw: str = ""


@dataclass(slots=True)
class FailureView:
    time: float
    error: str = ""
    raw: str = ""


@dataclass(slots=True)
class RegisteredModel:
    """A registered model as the registry, its queue and its usage statistics describe it."""

    model_id: str
    size: int = 0  # bytes; 0 = unknown (the settings' default size is assumed)
    min_copies: int | None = None  # None: the settings' default
    max_copies: int | None = None
    copies: dict[str, RegistryCopy] = field(default_factory=dict)  # worker -> registry record
    failures: dict[str, FailureView] = field(default_factory=dict)  # worker -> failure record
    queue_depth: int = 0  # requests waiting in the model's queue
    last_used: float = 0.0  # newest use ever seen (heartbeats fold in newer values)
    score: float = 0.0  # long-run request rate (req/s, exponentially decayed): its value in cache
    rate: float | None = None  # requests/s; None: the sum of its copies' heartbeat rates
    # only workers carrying these labels may hold it (mesh/policy/labels.py); None/{}: any
    required_labels: dict[str, str] | None = None


@dataclass(slots=True)
class PastAction:
    """An action a previous run sent: the planner's memory for pending work and the churn guard."""

    time: float
    op: Literal["load", "unload"]
    model_id: str
    worker: str
    reason: str = ""


@dataclass(slots=True)
class ClusterState:
    workers: list[WorkerView]
    models: list[RegisteredModel]
    history: list[PastAction] = field(default_factory=list)
    # Not registered any more, but their copies stay until the requests already routed to them
    # are answered (vmodel auto-delete, mesh/control/vmodels.py drain): not ours to unload.
    retiring: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Load:
    model_id: str
    worker: str
    reason: str
    op: Literal["load"] = "load"


@dataclass(frozen=True, slots=True)
class Unload:
    model_id: str
    worker: str
    reason: str
    op: Literal["unload"] = "unload"


@dataclass(frozen=True, slots=True)
class DropCopy:
    """Delete a registry copy record (its worker is dead, or it never loaded)."""

    model_id: str
    worker: str
    reason: str
    raw: str = ""  # delete only if the record is still exactly this
    op: Literal["drop_copy"] = "drop_copy"


@dataclass(frozen=True, slots=True)
class ClearFailure:
    """Delete an expired failure record, which lets the model be retried on that worker."""

    model_id: str
    worker: str
    raw: str = ""
    op: Literal["clear_failure"] = "clear_failure"


@dataclass(frozen=True, slots=True)
class ForgetWorker:
    """Remove a dead worker (no heartbeat) from the worker set."""

    worker: str
    op: Literal["forget_worker"] = "forget_worker"


PlanAction = Load | Unload | DropCopy | ClearFailure | ForgetWorker

# Reasons. Unloads for these reasons free space for something else: the churn guard does not
# let the same model come back by evicting another within `churn_age_s` (no cascades).
R_ORPHAN = "queued-requests"
R_DRAIN = "drain"
R_PINNED = "min-copies"
R_SCALE = "scale-up"
R_REDUNDANT = "second-copy"
R_PROACTIVE = "proactive"
R_SPACE = "space"
R_IDLE = "idle"
R_MAX = "max-copies"
R_UNREGISTERED = "unregistered"
R_DEAD = "dead-worker"
R_STALE = "stale"
R_REASSERT = "reassert"
EVICTING_REASONS = frozenset({R_SPACE, R_IDLE, R_MAX})

# Registry records and heartbeats carry different hosts' clocks.
CLOCK_SKEW_S = 5.0

_LOWEST = (0, 0.0, 0.0)  # evict-heap key of a worker holding a surplus copy; also a lower bound

# Need classes, served in this order; the first three may evict anything unprotected.
ORPHAN, DRAIN, PINNED, SCALE, REDUNDANT = range(5)
_REASON = {ORPHAN: R_ORPHAN, DRAIN: R_DRAIN, PINNED: R_PINNED, SCALE: R_SCALE, REDUNDANT: R_REDUNDANT}


# --------------------------------------------------------------------------- settings


# The planner's knobs that are MESH_* settings too, under the same names. Their defaults are
# MeshSettings', so the beat, the simulator and the tests plan with the same numbers unless
# they override one on purpose.
SHARED_KNOBS: tuple[str, ...] = (
    "scale_up_rps_per_copy", "scale_up_queue_per_copy", "scale_down_ratio", "copy_idle_s",
    "model_idle_s", "churn_age_s", "load_failure_expiry_s", "max_load_attempts", "drain_recent_s",
    "proactive_loading", "proactive_fill_fraction", "max_loads_per_tick", "max_loads_per_worker",
    "max_evictions_per_tick", "default_model_size_bytes", "default_min_copies", "default_max_copies",
)  # fmt: skip

# Planner-only knobs that from_settings derives from the beat period and the heartbeat TTL; the
# floors keep a fast beat from resending a load, or dropping its registry record, while it is
# still in flight.
PENDING_ACTION_TTL_MIN_S = 15.0
STALE_COPY_MIN_S = 30.0


def _mesh_default(knob: str) -> Any:
    assert knob in SHARED_KNOBS, knob
    return MeshSettings.model_fields[knob].default


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """Every knob of the planner; docs/scheduler.md gives the reasoning behind each default.
    The knobs in SHARED_KNOBS take their defaults from MeshSettings: build the settings a
    deployment runs with by `PlannerSettings.from_settings`."""

    # copies from load (ModelMesh.java `rateTrackingTask`: 2000 rpm per copy), with hysteresis
    scale_up_rps_per_copy: float = _mesh_default("scale_up_rps_per_copy")
    scale_up_queue_per_copy: int = _mesh_default("scale_up_queue_per_copy")
    # keep n copies while rate > (n-1) * threshold * ratio
    scale_down_ratio: float = _mesh_default("scale_down_ratio")
    # idle behaviour (kserve/modelmesh-serving#312: "LRU is not time-based"): extra copies of a model unused
    # copy_idle_s are unloaded; with model_idle_s > 0, so is the last copy after that long
    copy_idle_s: float = _mesh_default("copy_idle_s")
    model_idle_s: float = _mesh_default("model_idle_s")
    # churn guard (ModelMesh.java `minChurnAgeMs`) and pending work
    churn_age_s: float = _mesh_default("churn_age_s")
    pending_action_ttl_s: float = PENDING_ACTION_TTL_MIN_S
    stale_copy_s: float = STALE_COPY_MIN_S
    # failures (ModelMesh.java: load-failure records, `MAX_LOAD_FAILURES`)
    load_failure_expiry_s: float = _mesh_default("load_failure_expiry_s")
    max_load_attempts: int = _mesh_default("max_load_attempts")
    # drain (ModelMesh.java `preShutdown`: copies used in the last hour)
    drain_recent_s: float = _mesh_default("drain_recent_s")
    # proactive loading (ModelMesh.java's leader reaper) and the usage-pattern second copy
    # (`rateTrackingTask`)
    proactive_loading: bool = _mesh_default("proactive_loading")
    proactive_fill_fraction: float = _mesh_default("proactive_fill_fraction")
    swap_factor: float = 2.0  # a proactive load may replace copies worth this many times less
    redundancy_free_fraction: float = 0.10
    second_copy_min_age_s: float = 420.0
    # budgets per run
    max_loads_per_tick: int = _mesh_default("max_loads_per_tick")
    # loads in progress on one worker, this run's included
    max_loads_per_worker: int = _mesh_default("max_loads_per_worker")
    max_evictions_per_tick: int = _mesh_default("max_evictions_per_tick")
    # placement
    busy_factor: float = 1.5  # a worker above this x the mean request rate is placed on last
    search_limit: int = 16
    default_model_size_bytes: int = _mesh_default("default_model_size_bytes")
    default_min_copies: int = _mesh_default("default_min_copies")
    default_max_copies: int | None = _mesh_default("default_max_copies")

    @classmethod
    def from_settings(cls, settings: MeshSettings) -> PlannerSettings:
        """The planner's knobs as MESH_* settings set them (docs/scheduler.md lists them)."""
        # an action stays pending until heartbeats can show it: two beats plus a heartbeat TTL
        pending = max(PENDING_ACTION_TTL_MIN_S, 2 * settings.rebalance_interval_s + settings.heartbeat_ttl_s)
        return cls(
            pending_action_ttl_s=pending,
            stale_copy_s=max(STALE_COPY_MIN_S, 2 * pending),
            **{knob: getattr(settings, knob) for knob in SHARED_KNOBS},
        )


# --------------------------------------------------------------------------- planner internals


class _WorkerPlan:
    """A live worker as this run leaves it: free space and loads net of what the run plans."""

    __slots__ = (
        "view", "name", "free", "rate", "loads", "draining", "planned", "leaving",
        "version", "victims", "quiet_score", "quiet_used",
    )  # fmt: skip

    def __init__(self, view: WorkerView) -> None:
        self.view = view
        self.name = view.name
        self.free = view.capacity - view.used
        self.rate = view.rate
        self.loads = len(view.loading)  # loads in progress count against max_loads_per_worker
        self.draining = view.shutting_down
        self.planned: set[str] = set()  # models pending or planned here (loads)
        self.leaving: set[str] = set()  # models pending or planned to leave (unloads)
        self.version = 0
        self.victims: list[tuple[int, float, float, str]] | None = None
        # (score, last use) of its least valuable copy of a model left unbuilt as quiet
        # (`_Plan.lazy`), kept by `_each_model`: most of `_evict_head(rough=True)`, found there
        self.quiet_score = self.quiet_used = INF


class _ModelPlan:
    """A model this run plans for: its copies by state, demand, and effective copy bounds."""

    __slots__ = (
        "view", "id", "size", "min_copies", "max_copies", "loaded", "loading", "draining", "rate",
        "last_used", "queue", "failed_on", "n_fresh", "surplus", "floor", "touched",
        "copy_age", "score", "required", "hb",
    )  # fmt: skip

    def __init__(self, view: RegisteredModel, settings: PlannerSettings) -> None:
        self.view = view
        self.id = view.model_id
        self.size = view.size or settings.default_model_size_bytes
        min_copies = view.min_copies if view.min_copies is not None else settings.default_min_copies
        max_copies = view.max_copies if view.max_copies is not None else settings.default_max_copies
        self.min_copies = min_copies
        self.max_copies = max(min_copies, max_copies) if max_copies is not None else 1 << 30
        self.loaded: list[_WorkerPlan] = []
        self.loading: list[_WorkerPlan] = []
        self.draining: list[_WorkerPlan] = []
        self.rate = 0.0
        self.last_used = view.last_used
        self.score = view.score
        self.queue = view.queue_depth
        self.failed_on: set[str] = set()
        self.n_fresh = 0
        self.surplus = 0
        self.floor = 0
        self.touched = False  # needed or placed this run: not an eviction victim
        self.copy_age = 0.0  # age of its oldest loaded copy
        self.required = view.required_labels or None  # its pool's labels (None: any worker)
        self.hb: list[tuple[_WorkerPlan, CopyView]] | tuple[()] = ()  # its copies on live workers


@dataclass(slots=True)
class _Need:
    cls: int
    order: float
    model: _ModelPlan
    count: int


class _Plan:
    def __init__(self, cluster: ClusterState, settings: PlannerSettings, now: float) -> None:
        self.cluster = cluster
        self.settings = settings
        self.now = now
        self.head: list[PlanAction] = []  # bookkeeping: forget workers, drop records, clear failures
        self.unloads: list[Unload] = []
        self.loads: list[Load] = []
        self.workers: dict[str, _WorkerPlan] = {}
        self.models: dict[str, _ModelPlan] = {}
        self.lazy: dict[str, tuple[RegisteredModel, list[tuple[_WorkerPlan, CopyView]]]] = {}
        self.needs: list[_Need] = []
        self.idle_models: list[RegisteredModel] = []  # no copy, no demand: proactive candidates
        self.loads_left = settings.max_loads_per_tick
        self.evictions_left = settings.max_evictions_per_tick
        self.fit_heap: list[tuple[int, int, str]] = []
        # built on the first eviction search: most runs never need one
        self.evict_heap: list[tuple[tuple[int, float, float], int, str]] | None = None
        self.recently_evicted: dict[str, float] = {}
        self.evicted_from: set[tuple[str, str]] = set()
        self.pools: dict[frozenset[tuple[str, str]], list[_WorkerPlan]] = {}  # by required labels
        # a fit heap per pool (as `fit_heap`, over the pool's workers), and the pools of each worker
        self.pool_heaps: dict[frozenset[tuple[str, str]], list[tuple[int, int, str]]] = {}
        self.pools_of: dict[str, list[frozenset[tuple[str, str]]]] = {}

    # ------------------------------------------------------------------ run
    def run(self) -> list[PlanAction]:
        by_model, loading_by_model = self._index_workers()
        pend_load, pend_unload = self._read_history()
        views = {mv.model_id: mv for mv in self.cluster.models} if pend_load else {}
        self._resolve_pending(views, pend_load, pend_unload, loading_by_model)
        self._each_model(by_model, loading_by_model)
        for model_id, copies in by_model.items():  # loaded but no longer registered
            if model_id in self.cluster.retiring:
                continue
            for w, _ in copies:
                if model_id not in w.leaving:
                    self._unload(model_id, w, R_UNREGISTERED, size=copies[0][1].size)
        self._build_heaps()
        self.needs.sort(key=lambda n: (n.cls, n.order))
        for need in self.needs:
            self._serve(need)
        if self.settings.proactive_loading:
            self._proactive()
        return [*self.head, *self.unloads, *self.loads]

    # ------------------------------------------------------------------ indexing
    def _index_workers(self) -> tuple[dict[str, list[tuple[_WorkerPlan, CopyView]]], dict[str, list[_WorkerPlan]]]:
        by_model: dict[str, list[tuple[_WorkerPlan, CopyView]]] = {}
        loading_by_model: dict[str, list[_WorkerPlan]] = {}
        for wv in self.cluster.workers:
            if not wv.alive:
                # ModelMesh prunes a vanished instance's registrations (its leader reaper,
                # `ASSUME_INSTANCE_GONE_AFTER_MS` in ModelMesh.java); the heartbeat TTL
                # is our grace period, so a worker without one is gone
                self.head.append(ForgetWorker(wv.name))
                continue
            w = _WorkerPlan(wv)
            self.workers[wv.name] = w
            for model_id, copy in wv.models.items():
                lst = by_model.get(model_id)
                if lst is None:
                    by_model[model_id] = [(w, copy)]
                else:
                    lst.append((w, copy))
            for model_id in wv.loading:
                loading_by_model.setdefault(model_id, []).append(w)
        return by_model, loading_by_model

    def _read_history(self) -> tuple[dict[tuple[str, str], float], set[tuple[str, str]]]:
        now, s = self.now, self.settings
        pend_load: dict[tuple[str, str], float] = {}
        pend_unload: set[tuple[str, str]] = set()
        for a in self.cluster.history:
            age = now - a.time
            key = (a.model_id, a.worker)
            if a.op == "load":
                if age < s.pending_action_ttl_s:
                    pend_load[key] = max(a.time, pend_load.get(key, 0.0))
            elif a.op == "unload":
                if age < s.pending_action_ttl_s:
                    pend_unload.add(key)
                if age < s.churn_age_s and a.reason in EVICTING_REASONS:
                    self.recently_evicted[a.model_id] = max(a.time, self.recently_evicted.get(a.model_id, 0.0))
                    self.evicted_from.add(key)
        return pend_load, pend_unload

    def _resolve_pending(
        self,
        views: dict[str, RegisteredModel],
        pend_load: dict[tuple[str, str], float],
        pend_unload: set[tuple[str, str]],
        loading_by_model: dict[str, list[_WorkerPlan]],
    ) -> None:
        """Apply what earlier runs sent and the heartbeats do not show yet, so a run that
        follows closely neither repeats a load nor counts a leaving copy."""
        for (model_id, name), t in pend_load.items():
            w = self.workers.get(name)
            mv = views.get(model_id)
            if w is None or mv is None or model_id in w.view.models or model_id in w.view.loading:
                continue
            failure = mv.failures.get(name)
            if failure is not None and failure.time >= t:
                continue  # it was tried and failed
            w.planned.add(model_id)
            w.loads += 1
            w.free -= mv.size or self.settings.default_model_size_bytes
            loading_by_model.setdefault(model_id, []).append(w)
        for model_id, name in pend_unload:
            w = self.workers.get(name)
            if w is not None and model_id in w.view.models:
                w.leaving.add(model_id)  # its bytes stay counted until the worker reports them free

    # ------------------------------------------------------------------ per model
    def _each_model(
        self,
        by_model: dict[str, list[tuple[_WorkerPlan, CopyView]]],
        loading_by_model: dict[str, list[_WorkerPlan]],
    ) -> None:
        """Every registered model, with its heartbeat copies and loads in progress (taken out
        of `by_model` and `loading_by_model`).

        Two shortcuts cover nearly every model of a large cluster; anything unusual (failures,
        queued requests, loads in progress, pinning, several copies) takes the full path,
        `_model_full`. The loop runs 100,000 times a run at scale, so its tests are spelled
        out inline rather than in a method per model (the calls were a quarter of `plan`)."""
        s, now = self.settings, self.now
        default_min = s.default_min_copies
        default_max = s.default_max_copies or 2
        threshold, copy_idle_s, min_age = s.scale_up_rps_per_copy, s.copy_idle_s, s.second_copy_min_age_s
        model_idle_s = s.model_idle_s
        idle_models, lazy, full = self.idle_models, self.lazy, self._model_full
        hb_of, loading_of = by_model.pop, loading_by_model.pop
        for mv in self.cluster.models:
            model_id = mv.model_id
            hb = hb_of(model_id, None)
            loading = loading_of(model_id, None) if loading_by_model else None
            if (
                mv.failures
                or mv.queue_depth
                or loading is not None
                or mv.rate is not None
                or (mv.min_copies if mv.min_copies is not None else default_min)
            ):
                full(mv, hb, loading)
                continue
            if hb is None:
                if not mv.copies:  # not loaded anywhere and nothing asks for it
                    if mv.last_used > 0 or mv.score > 0:
                        idle_models.append(mv)
                    continue
            elif len(hb) == 1 and len(mv.copies) == 1:
                # one copy, registered: if `_demand` would leave it alone, its planning state is
                # built only if the copy is considered as an eviction victim (`_m`)
                w, copy = hb[0]
                if w.name in mv.copies and not w.draining and copy.rate <= threshold and model_id not in w.leaving:
                    last_used = mv.last_used if mv.last_used > copy.last_used else copy.last_used
                    if not (  # the usage-pattern second copy
                        copy.rate > 0
                        and now - last_used < copy_idle_s
                        and now - copy.loaded_at >= min_age
                        and (mv.max_copies if mv.max_copies is not None else default_max) >= 2
                    ) and not (model_idle_s > 0 and now - last_used >= model_idle_s):
                        lazy[model_id] = (mv, hb)
                        score = mv.score
                        if score < w.quiet_score or (score == w.quiet_score and copy.last_used < w.quiet_used):
                            w.quiet_score, w.quiet_used = score, copy.last_used
                        continue
            full(mv, hb, loading)

    def _model_full(
        self,
        mv: RegisteredModel,
        hb: list[tuple[_WorkerPlan, CopyView]] | None,
        loading: list[_WorkerPlan] | None,
    ) -> None:
        s, now = self.settings, self.now
        if mv.copies:
            placing = self._check_records(mv)
            if placing:  # being loaded by someone else (cold path, vmodel driver): a load in progress
                size = mv.size or s.default_model_size_bytes
                for w in placing:
                    w.free -= size
                loading = [*(loading or ()), *placing]
        fresh = 0
        failed_on: set[str] | None = None
        if mv.failures:
            failed_on = set()
            for name, f in mv.failures.items():
                if now - f.time >= s.load_failure_expiry_s:
                    self.head.append(ClearFailure(mv.model_id, name, f.raw))
                else:
                    fresh += 1
                    failed_on.add(name)
        min_copies = mv.min_copies if mv.min_copies is not None else s.default_min_copies
        if hb is None and loading is None and not mv.queue_depth and not min_copies:
            if fresh == 0 and (mv.last_used > 0 or mv.score > 0):
                self.idle_models.append(mv)
            return
        m = self._build(mv, hb, loading)
        m.n_fresh = fresh
        if failed_on:
            m.failed_on = failed_on
        self._demand(m)

    def _m(self, model_id: str) -> _ModelPlan | None:
        m = self.models.get(model_id)
        if m is None:
            lazy = self.lazy.pop(model_id, None)
            if lazy is None:
                return None
            m = self._build(lazy[0], lazy[1], None)
            m.floor = 0
            m.surplus = 0
        return m

    def _build(
        self,
        mv: RegisteredModel,
        hb: list[tuple[_WorkerPlan, CopyView]] | None,
        loading: list[_WorkerPlan] | None,
    ) -> _ModelPlan:
        s, now = self.settings, self.now
        m = _ModelPlan(mv, s)
        self.models[m.id] = m
        if hb:
            m.hb = hb
        rate = 0.0
        for w, copy in hb or ():
            rate += copy.rate
            if copy.last_used > m.last_used:
                m.last_used = copy.last_used
            if m.id in w.leaving:
                continue
            if w.draining:
                m.draining.append(w)
            else:
                m.loaded.append(w)
                m.copy_age = max(m.copy_age, now - copy.loaded_at)
            if w.name not in mv.copies and now - copy.loaded_at > s.stale_copy_s:
                # loaded but missing from the registry (e.g. dropped while its heartbeat lagged):
                # a load of a loaded model makes the worker re-assert its copy record
                self.loads.append(Load(m.id, w.name, R_REASSERT))
        m.rate = mv.rate if mv.rate is not None else rate
        if hb and mv.size == 0:
            m.size = max(c.size for _, c in hb) or m.size
        if loading:
            seen = {w.name for w in m.loaded}
            for w in loading:
                if not w.draining and w.name not in seen:
                    m.loading.append(w)
                    seen.add(w.name)
        return m

    def _check_records(self, mv: RegisteredModel) -> list[_WorkerPlan]:
        """Registry copies on dead workers go; so do copies a live worker never loaded or held
        before it restarted. Returns the workers whose record is fresh but not in their
        heartbeat yet: loads someone else just placed."""
        now, workers, model_id = self.now, self.workers, mv.model_id
        placing: list[_WorkerPlan] = []
        for name, rc in mv.copies.items():
            w = workers.get(name)
            if w is None:
                self.head.append(DropCopy(model_id, name, R_DEAD, rc.raw))
            elif model_id in w.view.models or model_id in w.view.loading or model_id in w.planned:
                continue
            elif now - rc.since > self.settings.stale_copy_s or rc.since < w.view.started_at - CLOCK_SKEW_S:
                self.head.append(DropCopy(model_id, name, R_STALE, rc.raw))
            elif not w.draining:
                placing.append(w)
        return placing

    def _demand(self, m: _ModelPlan) -> None:
        s, now = self.settings, self.now
        n_loaded = len(m.loaded)
        n_live = n_loaded + len(m.loading)
        threshold = s.scale_up_rps_per_copy
        idle_for = now - m.last_used

        # copies wanted from load: up when a copy is over the threshold or the queue grows
        want = math.ceil(m.rate / threshold) if m.rate > 0 else 0
        if n_loaded and not m.loading and m.queue > s.scale_up_queue_per_copy * n_loaded:
            want = max(want, n_live + 1)
        # hysteresis: n copies stay while rate > (n-1) * threshold * ratio
        keep = math.ceil(m.rate / (threshold * s.scale_down_ratio)) if m.rate > 0 else 0
        if m.queue:
            keep = max(keep, n_loaded)
        want = min(max(want, m.min_copies), m.max_copies)
        keep = min(max(keep, m.min_copies, 1), m.max_copies)
        m.floor = max(m.min_copies, 1 if m.queue else 0)
        m.surplus = max(0, n_loaded - keep)

        cls = SCALE
        if n_live == 0 and m.queue:
            want, cls = max(want, 1), ORPHAN
        elif n_live == 0 and m.draining and (idle_for < s.drain_recent_s or m.min_copies):
            want, cls = max(want, 1), DRAIN
        elif n_live < m.min_copies:
            cls = PINNED
        if (
            want <= 1
            and n_loaded == 1
            and not m.loading
            and m.max_copies >= 2
            and m.rate > 0
            and idle_for < s.copy_idle_s
            and m.copy_age >= s.second_copy_min_age_s
        ):
            # ModelMesh.java `rateTrackingTask`, "used regularly": a second copy in free space
            want, cls = 2, REDUNDANT

        if m.n_fresh >= s.max_load_attempts:
            want = 0  # fail fast until a failure record expires (ModelMesh.java `MAX_LOAD_FAILURES`)
        elif m.n_fresh and want > n_live:
            want = n_live + 1  # a failing model gets one retry at a time, elsewhere
        if want > n_live:
            count = want - n_live
            if cls == SCALE:
                count = min(count, max(1, n_live))  # load-driven copies at most double per run
            order = -m.queue if cls == ORPHAN else -m.last_used
            self.needs.append(_Need(cls, order, m, count))
            m.touched = True
            return

        # scale-down without space pressure: only past max_copies, or idle
        # (kserve/modelmesh-serving#312)
        if n_live > m.max_copies:
            self._shed(m, n_live - m.max_copies, R_MAX)
        elif n_loaded > max(1, m.min_copies) and idle_for >= s.copy_idle_s:
            self._shed(m, n_loaded - max(1, m.min_copies), R_IDLE)
        elif s.model_idle_s > 0 and n_loaded and not m.min_copies and not m.queue and idle_for >= s.model_idle_s:
            self._shed(m, n_loaded, R_IDLE)

    def _shed(self, m: _ModelPlan, count: int, reason: str) -> None:
        """Unload `count` loaded copies, from the fullest workers first; young copies stay."""
        now = self.now
        candidates = []
        for w in m.loaded:
            copy = w.view.models.get(m.id)
            if copy is None or (reason != R_MAX and now - copy.loaded_at < self.settings.churn_age_s):
                continue
            if (m.id, w.name) in self.evicted_from:
                continue
            candidates.append(w)
        candidates.sort(key=lambda w: (w.free, w.name))
        for w in candidates[:count]:
            m.loaded.remove(w)
            self._unload(m.id, w, reason, size=m.size)
        m.surplus = max(0, m.surplus - min(count, len(candidates)))

    def _unload(self, model_id: str, w: _WorkerPlan, reason: str, size: int) -> None:
        w.leaving.add(model_id)
        copy = w.view.models.get(model_id)
        w.free += copy.size if copy is not None else size
        w.version += 1
        self.unloads.append(Unload(model_id, w.name, reason))

    # ------------------------------------------------------------------ placement
    def _build_heaps(self) -> None:
        usable = [w for w in self.workers.values() if not w.draining]
        if usable:
            mean = sum(w.rate for w in usable) / len(usable)
            self.busy_rate = max(1.0, self.settings.busy_factor * mean)
            cap = sum(w.view.capacity for w in usable)
            self.free_fraction = sum(max(0, w.free) for w in usable) / cap if cap else 0.0
        else:
            self.busy_rate = INF
            self.free_fraction = 0.0
        self.usable = usable
        self.fit_heap = [(-w.free, w.version, w.name) for w in usable]
        heapq.heapify(self.fit_heap)

    def _pool(self, m: _ModelPlan) -> list[_WorkerPlan]:
        """The usable workers carrying `m`'s required labels, found once per label set."""
        key = frozenset(m.required.items())
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = [w for w in self.usable if matches(m.required, w.view.labels)]
            heap = self.pool_heaps[key] = [(-w.free, w.version, w.name) for w in pool]
            heapq.heapify(heap)
            for w in pool:
                self.pools_of.setdefault(w.name, []).append(key)
        return pool

    def _eligible(self, w: _WorkerPlan, m: _ModelPlan) -> bool:
        return (
            (m.required is None or matches(m.required, w.view.labels))
            and w.loads < self.settings.max_loads_per_worker
            and m.id not in w.view.models
            and m.id not in w.view.loading
            and m.id not in w.planned
            and w.name not in m.failed_on
            and (m.id, w.name) not in self.evicted_from
        )

    def _pick_fit(self, m: _ModelPlan, reserve_fraction: float = 0.0) -> _WorkerPlan | None:
        """The worker with the most free space that fits `m` without evicting, preferring one
        that is not busy (ModelMesh.java `PLACEMENT_ORDER`: non-full first, more free space,
        load-aware).

        A model with required labels searches its pool's heap instead: the shared one is
        ordered over every worker, and its `search_limit` pops could all land outside a small
        pool."""
        heap = self.fit_heap
        if m.required is not None:
            self._pool(m)
            heap = self.pool_heaps[frozenset(m.required.items())]
        popped: list[_WorkerPlan] = []
        chosen = fallback = None
        size = m.size
        while heap and len(popped) < self.settings.search_limit:
            _, version, name = heapq.heappop(heap)
            w = self.workers[name]
            if version != w.version:
                continue
            popped.append(w)
            if w.free < size:
                break  # ordered by free space: nobody further fits
            if not self._eligible(w, m):
                continue
            if w.free - size < reserve_fraction * w.view.capacity:
                continue
            if w.rate > self.busy_rate:
                fallback = fallback or w
                continue
            chosen = w
            break
        for w in popped:
            heapq.heappush(heap, (-w.free, w.version, w.name))
        return chosen or fallback

    def _pick_evict_in_pool(
        self, m: _ModelPlan, bar: tuple[float, float], proactive: bool, min_idle: float
    ) -> tuple[_WorkerPlan, list[tuple[str, int]]] | None:
        """`_pick_evict` within a small pool (see `_pick_fit`): its workers by their least
        valuable evictable copy, the first `search_limit` of them tried. O(pool's copies) per
        search, so only for a pool of under a quarter of the workers; a larger one searches
        the shared heap, passing over the workers outside it."""
        heads = sorted((self._evict_head(w), w.name) for w in self._pool(m) if self._eligible(w, m))
        for key, name in heads[: self.settings.search_limit]:
            if key[0] == 1 and not self._below(key[1], key[2], m, bar, proactive):
                break
            if key[0] == 2:
                break
            w = self.workers[name]
            victims = self._victims(w, m, bar, proactive, min_idle)
            if victims is not None:
                return w, victims
        return None

    def _pick_evict(
        self, m: _ModelPlan, bar: tuple[float, float], proactive: bool, min_idle: float
    ) -> tuple[_WorkerPlan, list[tuple[str, int]]] | None:
        """A worker where evicting only less valuable, unprotected copies makes room for `m`,
        taking the worker whose least valuable evictable copy is least valuable (ModelMesh.java
        `PLACEMENT_ORDER` orders full workers by LRU; we order by (usage score, last use), see _value)."""
        pool = None
        if m.required is not None:
            pool = self._pool(m)
            if 4 * len(pool) < len(self.usable):
                return self._pick_evict_in_pool(m, bar, proactive, min_idle)
        if self.evict_heap is None:
            self.evict_heap = self._rough_heads()
            heapq.heapify(self.evict_heap)
        popped: list[_WorkerPlan] = []
        outside: list[tuple[tuple[int, float, float], int, str]] = []  # heap entries of other pools
        found = None
        while self.evict_heap and len(popped) < self.settings.search_limit:
            key, version, name = heapq.heappop(self.evict_heap)
            w = self.workers[name]
            if version != w.version:
                continue
            if pool is not None and not matches(m.required, w.view.labels):
                outside.append((key, version, name))
                continue
            popped.append(w)
            if key[0] == 1 and not self._below(key[1], key[2], m, bar, proactive):
                break  # every other worker's least valuable copy is worth more still
            if not self._eligible(w, m):
                continue
            victims = self._victims(w, m, bar, proactive, min_idle)
            if victims is not None:
                found = (w, victims)
                break
        for w in popped:
            if found is None or w is not found[0]:
                heapq.heappush(self.evict_heap, (self._evict_head(w), w.version, w.name))
        for entry in outside:
            heapq.heappush(self.evict_heap, entry)
        return found

    def _rough_heads(self) -> list[tuple[tuple[int, float, float], int, str]]:
        """The evict heap's first entries: `_evict_head(w, rough=True)` for every usable worker.

        A worker nothing happened to since `_each_model` (its version is 0: no load placed, no
        copy leaving) has its quiet copies' part of that minimum in `quiet_score` and
        `quiet_used`; only the copies of the models built (`self.models`) are added here,
        instead of looking every copy of every worker up again. Any other worker is computed
        in full."""
        best: dict[str, list[Any]] = {
            w.name: [w.quiet_score, w.quiet_used, False] for w in self.usable if not w.version
        }  # fmt: skip
        for m in self.models.values():
            for w, copy in m.hb:
                b = best.get(w.name)
                if b is None:
                    continue
                if m.surplus > 0:
                    b[2] = True
                elif m.id not in w.leaving:
                    score = m.score
                    if score < b[0] or (score == b[0] and copy.last_used < b[1]):
                        b[0], b[1] = score, copy.last_used
        heads = []
        for w in self.usable:
            b = best.get(w.name)
            if b is None:
                key = self._evict_head(w, rough=True)
            elif b[2]:
                key = _LOWEST
            else:
                key = (1, b[0], b[1]) if b[0] < INF or b[1] < INF else (2, INF, INF)
            heads.append((key, w.version, w.name))
        return heads

    def _below(self, score: float, last_used: float, m: _ModelPlan, bar: tuple[float, float], proactive: bool) -> bool:
        """May a copy of this value make room for `m`? A proactive swap needs `m` to be worth
        `swap_factor` times more, so two similar models never take turns."""
        if proactive:
            return score * self.settings.swap_factor < m.score
        return (score, last_used) < bar

    def _sorted_victims(self, w: _WorkerPlan) -> list[tuple[int, float, float, str]]:
        if w.victims is None:
            victims = []
            for mid, c in w.view.models.items():
                if mid in w.leaving:
                    continue
                m = self._m(mid)
                if m is not None:  # None: not registered (being unloaded)
                    victims.append((0 if m.surplus > 0 else 1, m.score, c.last_used, mid))
            victims.sort()
            w.victims = victims
        return w.victims

    def _evict_head(self, w: _WorkerPlan, rough: bool = False) -> tuple[int, float, float]:
        """Heap key: (0, ...) if the worker holds a surplus copy, else (1, score, last use) of
        its least valuable evictable copy ((2, INF, INF) if none). `rough` skips the sort and
        the protection checks: it gives a lower bound, refined when the worker is popped."""
        if rough:
            best_s = best_t = INF
            models, lazy, leaving = self.models, self.lazy, w.leaving
            for mid, c in w.view.models.items():
                quiet = lazy.get(mid)  # most copies (a model is in `lazy` or in `models`, never both)
                if quiet is not None:
                    score = quiet[0].score
                else:
                    m = models.get(mid)
                    if m is None:
                        continue
                    if m.surplus > 0:
                        return _LOWEST
                    score = m.score
                if score < best_s or (score == best_s and c.last_used < best_t):
                    if mid not in leaving:
                        best_s, best_t = score, c.last_used
            return (1, best_s, best_t) if best_s < INF or best_t < INF else (2, INF, INF)
        for tier, score, last_used, mid in self._sorted_victims(w):
            if mid in w.leaving:
                continue
            m = self.models[mid]  # built by _sorted_victims
            if self._protected(w, m):
                continue
            return _LOWEST if (tier == 0 and m.surplus > 0) else (1, score, last_used)
        return (2, INF, INF)

    def _protected(self, w: _WorkerPlan, victim: _ModelPlan) -> bool:
        copy = w.view.models[victim.id]
        return (
            victim.touched
            or self.now - copy.loaded_at < self.settings.churn_age_s  # churn guard: a young copy stays
            or len(victim.loaded) - 1 < victim.floor  # min copies; the last copy of a queued model
        )

    def _victims(
        self, w: _WorkerPlan, m: _ModelPlan, bar: tuple[float, float], proactive: bool, min_idle: float
    ) -> list[tuple[str, int]] | None:
        now = self.now
        need = m.size - w.free
        chosen: list[tuple[str, int]] = []
        freed = 0
        budget = self.evictions_left
        for tier, score, last_used, mid in self._sorted_victims(w):
            if mid in w.leaving:
                continue
            victim = self.models[mid]
            if self._protected(w, victim):
                continue
            if not (tier == 0 and victim.surplus > 0):
                if now - last_used < min_idle:
                    continue  # churn guard: used too recently
                if not self._below(score, last_used, m, bar, proactive):
                    if tier == 1:
                        break  # sorted by value: the rest are worth more
                    continue
            size = w.view.models[mid].size
            chosen.append((mid, size))
            freed += size
            if len(chosen) > budget:
                return None
            if freed >= need:
                return chosen
        return None

    def _at_home(self, m: _ModelPlan, bar: tuple[float, float], min_idle: float) -> tuple[_WorkerPlan, list[tuple[str, int]]] | None:
        """A proactive swap-in on the model's rendezvous home, or nowhere.

        When every worker is full the cold path loads a model on its home
        (`mesh.policy.placement.choose_worker`). A copy the planner swaps in elsewhere is evicted
        sooner or later and then reloaded on its home: two loads for one. Swapping in only
        on the home keeps the planner and the cold path placing a model in the same place."""
        pool = self.usable if m.required is None else self._pool(m)  # the cold path's home is in the pool too
        home = max(pool, key=lambda w: (affinity(m.id, w.name), w.name), default=None)
        if home is None or not self._eligible(home, m):
            return None
        victims = self._victims(home, m, bar, True, min_idle)
        return None if victims is None else (home, victims)

    def _place(self, m: _ModelPlan, w: _WorkerPlan, reason: str, victims: Iterable[tuple[str, int]] = ()) -> None:
        for mid, _size in victims:
            victim = self.models[mid]
            if w in victim.loaded:
                victim.loaded.remove(w)
            victim.surplus = max(0, victim.surplus - 1)
            self._unload(mid, w, R_SPACE, size=victim.size)
            self.evictions_left -= 1
        w.free -= m.size
        w.loads += 1
        w.planned.add(m.id)
        w.rate += m.rate / (len(m.loaded) + len(m.loading) + 1)
        w.version += 1
        m.loading.append(w)
        m.touched = True
        self.loads_left -= 1
        self.loads.append(Load(m.id, w.name, reason))
        heapq.heappush(self.fit_heap, (-w.free, w.version, w.name))
        for key in self.pools_of.get(w.name, ()):
            heapq.heappush(self.pool_heaps[key], (-w.free, w.version, w.name))
        if self.evict_heap is not None:  # a lower bound, made exact if the worker is popped
            heapq.heappush(self.evict_heap, (_LOWEST, w.version, w.name))

    def _serve(self, need: _Need) -> None:
        m, cls = need.model, need.cls
        reason = _REASON[cls]
        for _ in range(need.count):
            if self.loads_left <= 0:
                return
            if cls == REDUNDANT:
                if self.free_fraction < self.settings.redundancy_free_fraction:
                    return
                w = self._pick_fit(m, reserve_fraction=1.0 - self.settings.proactive_fill_fraction)
                if w is None:
                    return
                self._place(m, w, reason)
                continue
            w = self._pick_fit(m)
            if w is not None:
                self._place(m, w, reason)
                continue
            # no room anywhere: evict less valuable copies, unless this model was itself just
            # evicted for space (no cascades) and nothing waits for it
            if cls not in (ORPHAN, PINNED) and m.id in self.recently_evicted:
                return
            if self.evictions_left <= 0:
                # the run's evictions are spent: `_victims` finds none, and the search (up to
                # `search_limit` workers per need, for every need left) would be for nothing
                return
            if cls in (ORPHAN, PINNED):
                bar = (INF, INF)
            elif cls == DRAIN:
                bar = (m.score, m.last_used)
            else:  # a model scaling up is worth at least its current rate
                bar = (max(m.score, m.rate), self.now)
            # waiting requests outrank the idle-age half of the churn guard (never the copy-age half)
            min_idle = 0.0 if cls == ORPHAN else self.settings.churn_age_s
            found = self._pick_evict(m, bar, proactive=False, min_idle=min_idle)
            if found is None:
                return
            self._place(m, found[0], reason, found[1])

    def _proactive(self) -> None:
        """Load the most valuable models that have no copy (ModelMesh.java's leader reaper,
        valued by usage score then recency): into free space up to the fill fraction, or in place of copies
        worth `swap_factor` times less (cortexlabs/cortex#619: keep the top N most queried
        models)."""
        s = self.settings
        if self.loads_left <= 0 or not self.idle_models:
            return
        horizon = self.now - s.model_idle_s if s.model_idle_s > 0 else -INF
        candidates = heapq.nlargest(
            self.loads_left * 2,
            (
                mv for mv in self.idle_models
                if mv.last_used > horizon and mv.model_id not in self.recently_evicted
            ),
            key=lambda mv: (mv.score, mv.last_used),
        )  # fmt: skip
        misses = 0
        reserve = 1.0 - s.proactive_fill_fraction
        for mv in candidates:
            if self.loads_left <= 0 or misses >= s.search_limit:
                return
            m = _ModelPlan(mv, s)
            w = self._pick_fit(m, reserve_fraction=reserve)
            if w is not None:
                self.models[m.id] = m
                self._place(m, w, R_PROACTIVE)
                misses = 0
                continue
            if m.score <= 0 or self.evictions_left <= s.max_evictions_per_tick // 2:
                misses += 1  # half the eviction budget stays for demand
                continue
            found = self._at_home(m, (m.score, m.last_used), min_idle=s.churn_age_s)
            if found is None:
                misses += 1
                continue
            self.models[m.id] = m
            self._place(m, found[0], R_PROACTIVE, found[1])
            misses = 0


def plan(cluster: ClusterState, settings: PlannerSettings, now: float) -> list[PlanAction]:
    """The actions that bring the cluster closer to what the rules want, in the order to send
    them: bookkeeping first, then unloads (they free the space later loads use), then loads."""
    # A run allocates ~10 objects per model and frees them all at the end, without cycles;
    # the cyclic collector would rescan the whole cluster state many times over for nothing.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _Plan(cluster, settings, now).run()
    finally:
        if enabled:
            gc.enable()


__all__ = [
    "SHARED_KNOBS",
    "ClearFailure",
    "ClusterState",
    "CopyView",
    "DropCopy",
    "FailureView",
    "ForgetWorker",
    "Load",
    "PastAction",
    "PlanAction",
    "PlannerSettings",
    "RegisteredModel",
    "RegistryCopy",
    "Unload",
    "WorkerView",
    "plan",
]
