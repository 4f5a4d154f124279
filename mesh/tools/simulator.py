"""Deterministic simulation of the scheduler over a modelled cluster (no Redis, no Celery).

`python -m mesh.tools.simulator` (or `scripts/simulate`) replays one request trace (Zipf traffic over
10,000 models on 100 workers; one model turning hot and cooling; a worker dying; a rolling
restart of every worker) against:

- **lru**: what the pool does without the beat: every worker an LRU by bytes, the producer's
  cold path (mesh/policy/placement.py's rule) places a model that has no copy, a stopping worker
  hands its models over (workers/worker.py `_hand_over`);
- **planner**: the same cluster with `mesh.policy.planner.plan` run every tick and its actions applied;
- **belady**: Belady's optimum (evict the model needed furthest in the future) on one pooled
  cache of the whole cluster's capacity: the lower bound no online policy reaches.

It reports cold loads (loads a request had to trigger) and waits (requests that found no loaded
copy) per 1,000 requests, by phase, the hot model's copies and backlog, and the planner's time
per tick; then the planner's time per tick on a synthetic 1,000 workers x 100,000 models.

Everything is seeded: the same arguments give the same report.
"""

from __future__ import annotations

import argparse
import heapq
import math
import platform
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mesh.policy.planner import (
    ClusterState,
    CopyView,
    DropCopy,
    FailureView,
    ForgetWorker,
    Load,
    PastAction,
    PlannerSettings,
    RegisteredModel,
    RegistryCopy,
    Unload,
    WorkerView,
    plan,
)

MB = 1024 * 1024


@dataclass
class SimConfig:
    n_workers: int = 100
    n_models: int = 10_000
    slots_per_worker: int = 50  # capacity in models: the cluster holds half of them
    model_size: int = 64 * MB  # equal sizes, so the pooled Belady bound is exact
    zipf_s: float = 1.0
    rps: int = 150
    duration_s: int = 3300
    warmup_s: int = 300
    tick_s: float = 5.0
    load_time_s: float = 2.0
    copy_rps: float = 25.0  # what one copy answers per second; above it requests queue
    hot_model: int = 7777  # popularity rank of the model that turns hot
    hot_start_s: int = 600
    hot_end_s: int = 1200
    hot_share: float = 0.4
    death_at_s: int = 1500
    dead_worker: int = 7
    roll_start_s: int = 2100
    roll_gap_s: float = 10.0
    restart_down_s: float = 5.0
    heartbeat_ttl_s: float = 3.0
    cold_path: str = "foundation"  # foundation | lru (ModelMesh's `PLACEMENT_ORDER` for full
    # workers, kserve/modelmesh src/main/java/com/ibm/watson/modelmesh/ModelMesh.java)
    usage_decay_s: float = 3600.0  # time constant of the models' usage score (decayed req/s)
    seed: int = 1

    def phases(self) -> list[tuple[str, int, int]]:
        return [
            ("steady", self.warmup_s, self.hot_start_s),
            ("hot model", self.hot_start_s, self.hot_end_s),
            ("cooling", self.hot_end_s, self.death_at_s),
            ("worker died", self.death_at_s, self.roll_start_s),
            ("rolling restart", self.roll_start_s, self.duration_s),
        ]


def sim_planner_settings(cfg: SimConfig) -> PlannerSettings:
    # only what the modelled cluster makes different; every other knob is the deployed default
    return PlannerSettings(
        scale_up_rps_per_copy=cfg.copy_rps * 0.8,
        scale_up_queue_per_copy=int(cfg.copy_rps * 2),
        default_model_size_bytes=cfg.model_size,
        pending_action_ttl_s=cfg.tick_s * 2,
        stale_copy_s=30.0,
        max_loads_per_worker=2,
        max_loads_per_tick=100,
        max_evictions_per_tick=100,
    )


# --------------------------------------------------------------------------- trace


@dataclass
class Trace:
    models: np.ndarray  # model index per request, in time order
    second_start: np.ndarray  # index of the first request of each second (len duration + 1)


def make_trace(cfg: SimConfig) -> Trace:
    rng = np.random.default_rng(cfg.seed)
    ranks = np.arange(1, cfg.n_models + 1, dtype=np.float64)
    p = ranks ** (-cfg.zipf_s)
    p /= p.sum()
    counts = rng.poisson(cfg.rps, size=cfg.duration_s)
    total = int(counts.sum())
    models = rng.choice(cfg.n_models, size=total, p=p).astype(np.int32)
    second_start = np.zeros(cfg.duration_s + 1, dtype=np.int64)
    np.cumsum(counts, out=second_start[1:])
    lo, hi = second_start[cfg.hot_start_s], second_start[cfg.hot_end_s]
    hot = rng.random(hi - lo) < cfg.hot_share
    models[lo:hi][hot] = cfg.hot_model
    return Trace(models=models, second_start=second_start)


def belady_misses(trace: Trace, capacity: int) -> np.ndarray:
    """Per request: 1 if Belady's MIN misses on a pooled cache of `capacity` equal-size models."""
    seq = trace.models
    n = len(seq)
    nxt = np.empty(n, dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        m = int(seq[i])
        nxt[i] = last.get(m, n + i)  # never again: beyond every real position
        last[m] = i
    miss = np.zeros(n, dtype=np.int8)
    cached: dict[int, int] = {}  # model -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, model), lazily invalidated
    for i in range(n):
        m = int(seq[i])
        if m in cached:
            cached[m] = int(nxt[i])
            heapq.heappush(heap, (-int(nxt[i]), m))
            continue
        miss[i] = 1
        if len(cached) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg:
                    del cached[victim]
                    break
        cached[m] = int(nxt[i])
        heapq.heappush(heap, (-int(nxt[i]), m))
    return miss


# --------------------------------------------------------------------------- the modelled cluster


class _Worker:
    __slots__ = ("idx", "name", "view", "lru", "loading", "served", "down_until")

    def __init__(self, idx: int, capacity: int) -> None:
        self.idx = idx
        self.name = f"w{idx:03d}"
        self.view = WorkerView(name=self.name, capacity=capacity)
        self.lru: OrderedDict[str, None] = OrderedDict()  # loaded models, least recent first
        self.loading: dict[str, float] = {}  # model -> time the load completes
        self.served: dict[str, int] = {}  # requests per model since the last tick
        self.down_until = 0.0

    @property
    def up(self) -> bool:
        return self.view.alive and not self.view.shutting_down


@dataclass
class SimResult:
    name: str
    requests: int = 0
    cold_loads: int = 0
    waits: int = 0
    planner_loads: int = 0
    planner_unloads: int = 0
    evictions: int = 0
    handover_loads: int = 0
    phase_requests: dict[str, int] = field(default_factory=dict)
    phase_cold: dict[str, int] = field(default_factory=dict)
    phase_waits: dict[str, int] = field(default_factory=dict)
    hot_max_copies: int = 0
    hot_copies_after: int = 0
    hot_backlog_max: float = 0.0
    hot_backlog_request_s: float = 0.0
    tick_times: list[float] = field(default_factory=list)
    wall_s: float = 0.0


class ClusterSim:
    def __init__(self, cfg: SimConfig, trace: Trace, use_planner: bool) -> None:
        self.cfg = cfg
        self.trace = trace
        self.use_planner = use_planner
        self._affinities: dict[int, np.ndarray] = {}
        self.settings = sim_planner_settings(cfg)
        cap = cfg.slots_per_worker * cfg.model_size
        self.workers = [_Worker(i, cap) for i in range(cfg.n_workers)]
        self.by_name = {w.name: w for w in self.workers}
        self.ids = [f"m{i:05d}" for i in range(cfg.n_models)]
        self.index = {m: i for i, m in enumerate(self.ids)}
        self.views = [RegisteredModel(model_id=m, size=cfg.model_size) for m in self.ids]
        self.copies: list[set[_Worker]] = [set() for _ in self.ids]  # loaded, on live workers
        self.loads_in_flight: list[set[_Worker]] = [set() for _ in self.ids]
        self.backlog = np.zeros(cfg.n_models, dtype=np.float64)
        self.score = np.zeros(cfg.n_models, dtype=np.float64)
        self.tick_arrivals = np.zeros(cfg.n_models, dtype=np.float64)
        self.history: list[PastAction] = []
        self.events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self.dead_listed: set[str] = set()  # dead workers still in the registry's worker set
        self.now = 0.0
        self.res = SimResult("planner" if use_planner else "lru-only")
        # cold-path scores, kept in arrays so a cold placement is one numpy argmax
        self.free = np.full(cfg.n_workers, float(cap))
        self.nmod = np.zeros(cfg.n_workers)
        self.usable = np.ones(cfg.n_workers, dtype=bool)
        self.oldest = np.full(cfg.n_workers, math.inf)

    # ------------------------------------------------------------------ events
    def _at(self, t: float, kind: str, data: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, data))

    def _run_events(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            t, _, kind, data = heapq.heappop(self.events)
            self.now = t
            getattr(self, f"_ev_{kind}")(data)

    def _ev_loaded(self, data: object) -> None:
        w, model_id = data  # type: ignore[misc]
        if w.loading.get(model_id) != self.now or not w.view.alive:
            return
        del w.loading[model_id]
        w.view.loading.discard(model_id)
        mi = self.index[model_id]
        self.loads_in_flight[mi].discard(w)
        w.view.models[model_id] = CopyView(model_id, self.cfg.model_size, self.now, self.now)
        w.lru[model_id] = None
        self._sync(w)
        self.copies[mi].add(w)
        self.views[mi].copies[w.name] = RegistryCopy("LOADED", self.now)

    def _ev_kill(self, data: object) -> None:
        w: _Worker = data  # type: ignore[assignment]
        self._drop_all(w)
        w.view.alive = False
        self.dead_listed.add(w.name)
        self.usable[w.idx] = False

    def _ev_stop(self, data: object) -> None:
        """SIGTERM: announce shutting down, hand sole copies over, leave (workers/worker.py)."""
        w: _Worker = data  # type: ignore[assignment]
        if not w.view.alive:
            return
        w.view.shutting_down = True
        self.usable[w.idx] = False
        for model_id in list(w.lru):
            mi = self.index[model_id]
            if len(self.copies[mi] - {w}) == 0 and not self.loads_in_flight[mi] - {w}:
                target = self._cold_target(mi)
                if target is not None:
                    self._start_load(target, model_id)
                    self.res.handover_loads += 1
        for model_id in list(w.lru) + list(w.loading):
            self.views[self.index[model_id]].copies.pop(w.name, None)  # remove_worker on exit
        self._drop_all(w)
        w.view.alive = False
        self._at(self.now + self.cfg.restart_down_s, "start", w)

    def _ev_start(self, data: object) -> None:
        w: _Worker = data  # type: ignore[assignment]
        w.view = WorkerView(name=w.name, capacity=w.view.capacity, started_at=self.now)
        w.lru.clear()
        w.loading.clear()
        w.served.clear()
        self.dead_listed.discard(w.name)
        self.usable[w.idx] = True
        self._sync(w)

    def _drop_all(self, w: _Worker) -> None:
        for model_id in list(w.lru):
            self.copies[self.index[model_id]].discard(w)
        for model_id in list(w.loading):
            self.loads_in_flight[self.index[model_id]].discard(w)
        w.lru.clear()
        w.loading.clear()
        w.view.models = {}
        w.view.loading = set()
        self._sync(w)

    # ------------------------------------------------------------------ worker mechanics
    def _sync(self, w: _Worker) -> None:
        size = self.cfg.model_size
        w.view.used = (len(w.lru) + len(w.loading)) * size
        self.free[w.idx] = w.view.capacity - w.view.used
        self.nmod[w.idx] = len(w.lru) + len(w.loading)
        self.oldest[w.idx] = w.view.models[next(iter(w.lru))].last_used if w.lru else math.inf

    def _evict(self, w: _Worker, model_id: str) -> None:
        del w.lru[model_id]
        del w.view.models[model_id]
        mi = self.index[model_id]
        self.copies[mi].discard(w)
        self.views[mi].copies.pop(w.name, None)

    def _start_load(self, w: _Worker, model_id: str) -> None:
        """The worker's manager: evict least recently used models until the load fits."""
        size = self.cfg.model_size
        while w.lru and (len(w.lru) + len(w.loading) + 1) * size > w.view.capacity:
            self._evict(w, next(iter(w.lru)))
            self.res.evictions += 1
        t = self.now + self.cfg.load_time_s
        w.loading[model_id] = t
        w.view.loading.add(model_id)
        mi = self.index[model_id]
        self.loads_in_flight[mi].add(w)
        self.views[mi].copies.setdefault(w.name, RegistryCopy("LOADING", self.now))
        self._sync(w)
        self._at(t, "loaded", (w, model_id))

    def _affinity(self, mi: int) -> np.ndarray:
        cached = self._affinities.get(mi)
        if cached is None:
            cached = self._affinities[mi] = np.random.default_rng(mi).random(len(self.workers))
        return cached

    def _cold_target(self, mi: int) -> _Worker | None:
        """mesh/policy/placement.py choose_worker: room first, most free bytes, fewest models, name;
        with cold_path='lru', full workers are ordered by their least recently used copy."""
        ok = self.usable.copy()
        for w in self.loads_in_flight[mi] | self.copies[mi]:
            ok[w.idx] = False
        if not ok.any():
            return None
        fits = ok & (self.free >= self.cfg.model_size)
        if self.cfg.cold_path == "lru" and not fits.any():
            return self.workers[int(np.argmin(np.where(ok, self.oldest, math.inf)))]
        if not fits.any():
            # the model's rendezvous home among the usable workers (mesh.policy.placement.affinity;
            # a seeded random score per (model, worker) has the same distribution)
            return self.workers[int(np.argmax(np.where(ok, self._affinity(mi), -math.inf)))]
        score = np.where(ok, self.free * 1e4 - self.nmod + np.where(fits, 1e15, 0.0), -math.inf)
        return self.workers[int(np.argmax(score))]

    # ------------------------------------------------------------------ requests
    def _request(self, mi: int, t: float) -> str:
        copies = self.copies[mi]
        if copies:
            model_id = self.ids[mi]
            w = min(copies, key=lambda w: w.served.get(model_id, 0)) if len(copies) > 1 else next(iter(copies))
            w.served[model_id] = w.served.get(model_id, 0) + 1
            first = next(iter(w.lru))
            w.lru.move_to_end(model_id)
            w.view.models[model_id].last_used = t
            if first == model_id:
                self.oldest[w.idx] = w.view.models[next(iter(w.lru))].last_used
            return "hit"
        if any(w.view.alive for w in self.loads_in_flight[mi]):
            return "wait"
        target = self._cold_target(mi)
        if target is not None:
            self._start_load(target, self.ids[mi])
        return "cold"

    # ------------------------------------------------------------------ planner
    def _tick(self) -> None:
        cfg, now = self.cfg, self.now
        for w in self.workers:
            if not w.view.alive:
                continue
            total = 0.0
            for model_id, c in w.view.models.items():
                c.rate = w.served.get(model_id, 0) / cfg.tick_s
                total += c.rate
            w.view.rate = total
            w.served.clear()
        for mi, view in enumerate(self.views):
            copies = self.copies[mi]
            if copies:
                view.last_used = max(view.last_used, max(w.view.models[view.model_id].last_used for w in copies))
        # the usage score: an exponentially decayed request rate (mesh/store/cluster.py keeps the
        # same in Redis from the heartbeats' per-copy rates)
        keep = math.exp(-cfg.tick_s / cfg.usage_decay_s)
        self.score *= keep
        self.score += (1.0 - keep) * self.tick_arrivals / cfg.tick_s
        self.tick_arrivals[:] = 0.0
        for view, value in zip(self.views, self.score.tolist()):
            view.score = value
        nz = np.nonzero(self.backlog)[0]
        for view in self.views:
            view.queue_depth = 0
        for mi in nz:
            self.views[mi].queue_depth = int(self.backlog[mi])
        listed = [w.view for w in self.workers if w.view.alive or w.name in self.dead_listed]
        horizon = now - max(self.settings.churn_age_s, self.settings.pending_action_ttl_s)
        self.history = [a for a in self.history if a.time >= horizon]
        cluster = ClusterState(workers=listed, models=self.views, history=self.history)
        t0 = time.perf_counter()
        actions = plan(cluster, self.settings, now)
        self.res.tick_times.append(time.perf_counter() - t0)
        for a in actions:
            if isinstance(a, Load):
                w = self.by_name[a.worker]
                if w.up and a.model_id not in w.lru and a.model_id not in w.loading:
                    self._start_load(w, a.model_id)
                    self.res.planner_loads += now >= cfg.warmup_s
                self.history.append(PastAction(now, "load", a.model_id, a.worker, a.reason))
            elif isinstance(a, Unload):
                w = self.by_name[a.worker]
                if a.model_id in w.lru:
                    self._evict(w, a.model_id)
                    self._sync(w)
                    self.res.planner_unloads += now >= cfg.warmup_s
                self.history.append(PastAction(now, "unload", a.model_id, a.worker, a.reason))
            elif isinstance(a, DropCopy):
                self.views[self.index[a.model_id]].copies.pop(a.worker, None)
            elif isinstance(a, ForgetWorker):
                self.dead_listed.discard(a.worker)

    # ------------------------------------------------------------------ main loop
    def run(self) -> SimResult:
        cfg, tr, res = self.cfg, self.trace, self.res
        started = time.perf_counter()
        self._at(cfg.death_at_s, "kill", self.workers[cfg.dead_worker])
        for i, w in enumerate(w for w in self.workers if w.idx != cfg.dead_worker):
            self._at(cfg.roll_start_s + i * cfg.roll_gap_s, "stop", w)
        phase_of = np.full(cfg.duration_s, "", dtype=object)
        for name, lo, hi in cfg.phases():
            phase_of[lo:hi] = name
        next_tick = cfg.tick_s
        hot = cfg.hot_model
        cap = cfg.copy_rps
        for sec in range(cfg.duration_s):
            lo, hi = int(tr.second_start[sec]), int(tr.second_start[sec + 1])
            n = hi - lo
            phase = phase_of[sec]
            cold = waits = 0
            for k in range(n):
                t = sec + k / max(n, 1)
                self._run_events(t)
                self.now = t
                outcome = self._request(int(tr.models[lo + k]), t)
                if outcome != "hit":
                    waits += 1
                    if outcome == "cold":
                        cold += 1
            self._run_events(sec + 1.0)
            self.now = sec + 1.0
            # throughput: each copy answers `copy_rps`; the rest waits in the model's queue
            arrivals = np.bincount(tr.models[lo:hi], minlength=cfg.n_models)
            self.tick_arrivals += arrivals
            for mi in np.nonzero(arrivals + self.backlog)[0]:
                capacity = len(self.copies[mi]) * cap
                self.backlog[mi] = max(0.0, self.backlog[mi] + arrivals[mi] - capacity)
            res.hot_backlog_max = max(res.hot_backlog_max, float(self.backlog[hot]))
            res.hot_backlog_request_s += float(self.backlog[hot])
            if cfg.hot_start_s <= sec < cfg.hot_end_s:
                res.hot_max_copies = max(res.hot_max_copies, len(self.copies[hot]))
            if sec == cfg.hot_end_s + 400:
                res.hot_copies_after = len(self.copies[hot])
            if phase:
                res.requests += n
                res.cold_loads += cold
                res.waits += waits
                res.phase_requests[phase] = res.phase_requests.get(phase, 0) + n
                res.phase_cold[phase] = res.phase_cold.get(phase, 0) + cold
                res.phase_waits[phase] = res.phase_waits.get(phase, 0) + waits
            if self.use_planner and sec + 1 >= next_tick:
                self._tick()
                next_tick += cfg.tick_s
        res.wall_s = time.perf_counter() - started
        return res


def belady_result(cfg: SimConfig, trace: Trace) -> SimResult:
    res = SimResult("belady")
    t0 = time.perf_counter()
    miss = belady_misses(trace, cfg.n_workers * cfg.slots_per_worker)
    for name, lo, hi in cfg.phases():
        a, b = int(trace.second_start[lo]), int(trace.second_start[hi])
        res.phase_requests[name] = b - a
        res.phase_cold[name] = int(miss[a:b].sum())
        res.requests += b - a
        res.cold_loads += int(miss[a:b].sum())
    res.waits = res.cold_loads
    res.phase_waits = dict(res.phase_cold)
    res.wall_s = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- scale benchmark


def synthetic_cluster(n_workers: int, n_models: int, seed: int, now: float) -> ClusterState:
    """A full cluster at scale for timing `plan`: Zipf rates, hot models with several copies,
    queued requests, pinned models, failures, dead and draining workers, recent history."""
    rng = np.random.default_rng(seed)
    size = 64 * MB
    slots = 100
    ranks = np.arange(1, n_models + 1, dtype=np.float64)
    rate = 2000.0 * ranks ** -1.0 / (ranks ** -1.0).sum() * 50
    workers = [
        WorkerView(name=f"w{i:04d}", capacity=slots * size)
        for i in range(n_workers)
    ]  # fmt: skip
    models = [RegisteredModel(model_id=f"m{i:06d}", size=size) for i in range(n_models)]
    # the most popular models get copies in proportion to their rate, then one copy each
    # down the popularity order until the cluster is full
    order = list(range(n_models))
    w_i = 0
    free = [slots] * n_workers
    for mi in order:
        copies = 1 + min(8, int(rate[mi] // 50))
        for _ in range(copies):
            tries = 0
            while free[w_i % n_workers] == 0 and tries < n_workers:
                w_i += 1
                tries += 1
            if tries >= n_workers:
                break
            w = workers[w_i % n_workers]
            if models[mi].model_id in w.models:
                w_i += 1
                continue
            idle = float(rng.exponential(600.0 * (mi + 1) / 1000))
            w.models[models[mi].model_id] = CopyView(
                model_id=models[mi].model_id, size=size, last_used=now - idle,
                loaded_at=now - 3600 - idle, rate=float(rate[mi] / copies),
            )  # fmt: skip
            models[mi].copies[w.name] = RegistryCopy("LOADED", now - 3600)
            free[w_i % n_workers] -= 1
            w_i += 1
        if all(f == 0 for f in free[:: max(1, n_workers // 50)]) and sum(free) == 0:
            break
    for w in workers:
        w.used = sum(c.size for c in w.models.values())
        w.rate = sum(c.rate for c in w.models.values())
    for mi in range(n_models):
        models[mi].last_used = now - float(rng.exponential(3600.0)) if rng.random() < 0.8 else 0.0
    for mi in rng.choice(n_models, size=n_models // 100, replace=False):
        models[mi].queue_depth = int(rng.integers(1, 200))
    for mi in rng.choice(n_models, size=50, replace=False):
        models[mi].min_copies = int(rng.integers(1, 3))
    for mi in rng.choice(n_models, size=100, replace=False):
        for w in rng.choice(n_workers, size=int(rng.integers(1, 4)), replace=False):
            models[mi].failures[f"w{w:04d}"] = FailureView(time=now - float(rng.uniform(0, 600)), error="boom")
    for i in rng.choice(n_workers, size=max(1, n_workers // 200), replace=False):
        workers[i].alive = False
    for i in rng.choice(n_workers, size=max(1, n_workers // 200), replace=False):
        workers[i].shutting_down = True
    history = [
        PastAction(time=now - float(rng.uniform(0, 60)), op="load" if k % 2 else "unload",
                   model_id=f"m{int(rng.integers(n_models)):06d}", worker=f"w{int(rng.integers(n_workers)):04d}",
                   reason="space")
        for k in range(400)
    ]  # fmt: skip
    return ClusterState(workers=workers, models=models, history=history)


def bench_plan(n_workers: int, n_models: int, runs: int, seed: int = 3) -> dict[str, float]:
    now = 1_000_000.0
    t0 = time.perf_counter()
    cluster = synthetic_cluster(n_workers, n_models, seed, now)
    build = time.perf_counter() - t0
    settings = PlannerSettings()  # every synthetic model has its size: the default is unused
    times = []
    n_actions = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        actions = plan(cluster, settings, now)
        times.append(time.perf_counter() - t0)
        n_actions = len(actions)
    copies = sum(len(w.models) for w in cluster.workers)
    return {
        "build_s": build, "median_s": statistics.median(times), "max_s": max(times),
        "actions": n_actions, "copies": copies,
    }  # fmt: skip


# --------------------------------------------------------------------------- report


def _per_k(num: int, den: int) -> str:
    return f"{1000.0 * num / den:.1f}" if den else "-"


def report(cfg: SimConfig, results: list[SimResult]) -> str:
    lines = []
    lines.append(
        f"{cfg.n_workers} workers x {cfg.slots_per_worker} model slots, {cfg.n_models} models "
        f"(Zipf s={cfg.zipf_s}), {cfg.rps} req/s for {cfg.duration_s} s simulated, load time "
        f"{cfg.load_time_s:g} s, planner tick {cfg.tick_s:g} s, cold path '{cfg.cold_path}', seed {cfg.seed}"
    )
    lines.append(
        f"events: model {cfg.hot_model} takes {cfg.hot_share:.0%} of traffic {cfg.hot_start_s}-{cfg.hot_end_s} s; "
        f"worker {cfg.dead_worker} killed at {cfg.death_at_s} s; rolling restart from {cfg.roll_start_s} s, "
        f"one worker every {cfg.roll_gap_s:g} s; first {cfg.warmup_s} s not counted"
    )
    lines.append("")
    lines.append("cold loads per 1,000 requests (requests that triggered a load)")
    header = f"{'phase':<18}" + "".join(f"{r.name:>12}" for r in results)
    lines.append(header)
    for name, _, _ in cfg.phases():
        row = f"{name:<18}"
        for r in results:
            row += f"{_per_k(r.phase_cold.get(name, 0), r.phase_requests.get(name, 0)):>12}"
        lines.append(row)
    lines.append(f"{'all':<18}" + "".join(f"{_per_k(r.cold_loads, r.requests):>12}" for r in results))
    lines.append("")
    lines.append("requests that found no loaded copy, per 1,000 (they waited for a load)")
    lines.append(header)
    for name, _, _ in cfg.phases():
        row = f"{name:<18}"
        for r in results:
            row += f"{_per_k(r.phase_waits.get(name, 0), r.phase_requests.get(name, 0)):>12}"
        lines.append(row)
    lines.append(f"{'all':<18}" + "".join(f"{_per_k(r.waits, r.requests):>12}" for r in results))
    lines.append("")
    lines.append("every load per 1,000 requests (cold + scheduler + hand-over): the work it costs")
    lines.append(
        f"{'all':<18}"
        + "".join(f"{_per_k(r.cold_loads + r.planner_loads + r.handover_loads, r.requests):>12}" for r in results)
    )
    lines.append("")
    for r in results:
        if r.name == "belady":
            continue
        extra = ""
        if r.tick_times:
            ticks = sorted(r.tick_times)
            extra = (
                f"; plan() per tick median {statistics.median(ticks) * 1000:.1f} ms, "
                f"p99 {ticks[int(len(ticks) * 0.99) - 1] * 1000:.1f} ms over {len(ticks)} ticks"
            )
        lines.append(
            f"{r.name}: hot model copies max {r.hot_max_copies} (400 s after cooling: {r.hot_copies_after}), "
            f"hot queue max {r.hot_backlog_max:.0f}, queued request-seconds {r.hot_backlog_request_s:.0f}; "
            f"planner loads {r.planner_loads}, planner unloads {r.planner_unloads}, LRU evictions {r.evictions}, "
            f"hand-over loads {r.handover_loads}{extra}; wall {r.wall_s:.1f} s"
        )
    return "\n".join(lines)


def run_all(cfg: SimConfig) -> list[SimResult]:
    trace = make_trace(cfg)
    return [
        ClusterSim(cfg, trace, use_planner=False).run(),
        ClusterSim(cfg, trace, use_planner=True).run(),
        belady_result(cfg, trace),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=SimConfig.n_workers)
    ap.add_argument("--models", type=int, default=SimConfig.n_models)
    ap.add_argument("--slots", type=int, default=SimConfig.slots_per_worker, help="models per worker")
    ap.add_argument("--rps", type=int, default=SimConfig.rps)
    ap.add_argument("--zipf", type=float, default=SimConfig.zipf_s)
    ap.add_argument("--tick", type=float, default=SimConfig.tick_s)
    ap.add_argument("--cold-path", choices=["foundation", "lru"], default=SimConfig.cold_path)
    ap.add_argument("--seed", type=int, default=SimConfig.seed)
    ap.add_argument("--scale-workers", type=int, default=1000)
    ap.add_argument("--scale-models", type=int, default=100_000)
    ap.add_argument("--scale-runs", type=int, default=5)
    ap.add_argument("--no-scale", action="store_true", help="skip the 1,000 x 100,000 timing")
    args = ap.parse_args(argv)
    cfg = SimConfig(
        n_workers=args.workers, n_models=args.models, slots_per_worker=args.slots, rps=args.rps,
        zipf_s=args.zipf, tick_s=args.tick, cold_path=args.cold_path, seed=args.seed,
        dead_worker=min(SimConfig.dead_worker, args.workers - 1),
        hot_model=min(SimConfig.hot_model, args.models - 1),
    )  # fmt: skip
    print(f"machine: {platform.machine()} {platform.processor() or ''} Python {sys.version.split()[0]}, "
          f"{_cpus()} CPUs", flush=True)
    print(report(cfg, run_all(cfg)), flush=True)
    if not args.no_scale:
        b = bench_plan(args.scale_workers, args.scale_models, args.scale_runs)
        print(
            f"\nplan() at {args.scale_workers} workers x {args.scale_models} models "
            f"({b['copies']} copies, {int(b['actions'])} actions): median {b['median_s'] * 1000:.0f} ms, "
            f"max {b['max_s'] * 1000:.0f} ms over {args.scale_runs} runs (state built in {b['build_s']:.1f} s)"
        )
    return 0


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
