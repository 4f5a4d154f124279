"""The scheduler's view of the cluster in Redis: bulk reads of everything the planner looks at,
and the writes that carry out its actions (guarded so they never undo a newer change).

mesh/control/rebalance.py orchestrates a run with it; the scheduler talks to Redis only through
the store (this module and mesh/store/vmodels.py, for the run's vmodel duty).
"""

from __future__ import annotations

import gc
import json
import math
import uuid

from collections.abc import Iterable, Iterator, KeysView
from typing import Any

# 1,000 heartbeats of 100 copies are 17 MB of JSON per run: orjson parses it 3x faster
from orjson import loads as _loads_fast

from mesh.models import CopyInfo, CopyState, FailedCopy, ModelRecord
from mesh.policy.planner import (
    ClusterState,
    CopyView,
    FailureView,
    PastAction,
    RegisteredModel,
    RegistryCopy,
    WorkerView,
)
from mesh.policy.precedence import copies_bounds, required_labels
from mesh.protocol.keys import Keys
from mesh.store.changes import ChangeReader, Mark, lua_log_change
from mesh.store.state import StateStore, list_length

CHUNK = 1000  # commands per pipeline round trip when reading per-model keys
# The scheduler keeps the usage in memory; Redis's copy is what a scheduler that takes over
# starts from. Each run writes the changed entries, up to a 1/USAGE_PERSIST_RUNS share of all
# (at least CHUNK): a run never rewrites 100,000 entries, and an entry that keeps changing is
# written again within about USAGE_PERSIST_RUNS runs (a minute at the default interval).
USAGE_PERSIST_RUNS = 12


# Delete a hash field only if it still holds exactly the value the planner saw; with ARGV[3]
# set, only while that worker has no heartbeat (a restarted worker keeps its new records).
_HDEL_IF_LUA = """
if ARGV[3] ~= '' and redis.call('EXISTS', ARGV[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  """ + lua_log_change("KEYS[2]", "ARGV[4]") + """
  return 1
end
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
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
""" + lua_log_change("KEYS[3]", "ARGV[1]") + """
return 1
"""


def _chunks(items: list[str], n: int = CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


_NONE: dict = {}  # shared by every model without copy (or failure) records: the planner never writes to it

Parsed = tuple[int, "int | None", "int | None", "dict[str, str] | None"]


class _Registry:
    """The scheduler's view of the registry, kept between the runs of one process: every
    registered model's parsed record, and the copy and failure records of those that have any."""

    def __init__(self, server: str, cursor: Mark) -> None:
        self.server = server  # Redis's run id: another server (or a restart) is another registry
        self.cursor = cursor  # the change log's point this view is current up to
        # model id -> its planner input; the next read updates the usage and queue fields of
        # these objects in place (a new one per model and run was a third of a run at 100,000)
        self.models: dict[str, RegisteredModel] = {}
        self.scan_cursor = 0  # the backstop's place in the registry (HSCAN)
        self.seen: set[str] = set()  # models the backstop saw in its current round
        self.queued: set[str] = set()  # models given a queue depth by the last read
        self._ids: list[str] | None = []
        self._list: list[RegisteredModel] | None = []
        # models that left since the last read's usage update, which need only look at these
        # (None: look at every entry, as after a read of everything)
        self.dropped: set[str] | None = None

    def put(self, model_id: str, parsed: Parsed, raw_copies: dict, raw_failures: dict) -> None:
        if model_id not in self.models:
            self._ids = None
        size, min_copies, max_copies, labels = parsed
        self.models[model_id] = RegisteredModel(
            model_id=model_id, size=size, min_copies=min_copies, max_copies=max_copies,
            copies=_copies(raw_copies) if raw_copies else _NONE,
            failures=_failures(raw_failures) if raw_failures else _NONE,
            required_labels=labels,
        )  # fmt: skip
        self.queued.add(model_id)  # a new object: its queue depth is set by the next read
        self._list = None

    def drop(self, model_id: str) -> None:
        if self.models.pop(model_id, None) is not None:
            self._ids = None
            self._list = None
            if self.dropped is not None:
                self.dropped.add(model_id)

    def ids(self) -> list[str]:
        """Registered model ids, sorted (as the planner was always given them)."""
        if self._ids is None:
            self._ids = sorted(self.models)
        return self._ids

    def listed(self) -> list[RegisteredModel]:
        """The models in id order."""
        if self._list is None:
            models = self.models
            self._list = [models[m] for m in self.ids()]
        return self._list


class ClusterStore:
    """Bulk reads of everything the planner looks at, in a bounded number of round trips, and
    the scheduler's writes: its leader lock, the registry bookkeeping its actions do, its
    history of sent actions and its last report."""

    # Parsed registry records by their raw JSON: records rarely change, and parsing 100,000 of
    # them with pydantic on every run would dominate it. Shared by the runs of one process.
    _record_cache: dict[bytes, Parsed] = {}
    # The registry and usage views of the last run, per Redis and prefix: the next run of this
    # process (a new ClusterStore each run) starts from them. `_stamp` names this process in
    # `Keys.usage_stamp`.
    _registries: dict[tuple[str, str], _Registry] = {}
    _usages: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    _dirty: dict[tuple[str, str], set[str]] = {}  # usage entries changed since written to Redis
    # Each live worker's copies as its last heartbeat gave them, by each copy's JSON text: a
    # heartbeat is rewritten every beat (its time, its busy copies' figures), but most of its
    # copies' entries are the same bytes as in the last run's, and parsing them again was a
    # third of a run at 100,000 copies (`_heartbeat_view`).
    _hb_copies: dict[tuple[str, str], dict[str, dict[bytes, CopyView]]] = {}
    _stamp = uuid.uuid4().hex

    def __init__(
        self, store: StateStore, priority_steps: list[int], usage_decay_s: float, refresh_runs: int = 60
    ) -> None:
        self.r = store.r
        self.keys: Keys = store.keys
        self.store = store
        self.priority_steps = priority_steps
        self.decay_s = usage_decay_s
        self.refresh_runs = max(1, refresh_runs)
        self.slice_min = CHUNK  # models the backstop re-reads per run at least
        self.change_log = ChangeReader(self.r, self.keys.changes)
        self._usage_read = True  # the last `usage` read Redis's hash (not the kept one)
        self._hdel_if = self.r.register_script(_HDEL_IF_LUA)
        self._forget = self.r.register_script(_FORGET_WORKER_LUA)
        self._mark_loading = self.r.register_script(_MARK_LOADING_LUA)

    # ------------------------------------------------------------------ reading
    def workers(self) -> list[WorkerView]:
        """Every listed worker as its heartbeat describes it (dead: listed, no heartbeat).

        The heartbeats are parsed (orjson) into the planner's views directly: 1,000 workers
        holding 100 copies each are 100,000 copies to parse per run, and pydantic's validation
        of `WorkerState` cost 5x more. A copy whose entry is byte for byte the one this worker's
        last heartbeat had is not parsed again (`_heartbeat_view`). A heartbeat that does not
        parse counts as no heartbeat (mesh writes them; anything else there is not a worker)."""
        names = sorted(n.decode() for n in self.r.smembers(self.keys.workers))
        key = (self._where(), self.keys.prefix)
        before = self._hb_copies.get(key) or {}
        kept: dict[str, dict[bytes, CopyView]] = {}
        views: list[WorkerView] = []
        for chunk in _chunks(names, 500):
            for name, raw in zip(chunk, self.r.mget([self.keys.worker(n) for n in chunk])):
                view = None
                if raw is not None:
                    parts: dict[bytes, CopyView] = {}
                    view = _heartbeat_view(name, raw, before.get(name, _NONE), parts)
                    if parts:
                        kept[name] = parts
                views.append(view or WorkerView(name=name, capacity=0, alive=False))
        self._hb_copies[key] = kept
        return views

    def records(self) -> dict[str, tuple[int, int | None, int | None, dict[str, str] | None]]:
        """model_id -> (size hint, min_copies, max_copies, required labels): every record, read
        at once (the first run's read; later runs read only what changed)."""
        out = {}
        for model_id, raw in self.r.hgetall(self.keys.models).items():
            out[model_id.decode()] = self._parse_record(raw)
        return out

    def _parse_record(self, raw: bytes) -> tuple[int, int | None, int | None, dict[str, str] | None]:
        cache = self._record_cache
        parsed = cache.get(raw)
        if parsed is None:
            if len(cache) > 400_000:
                cache.clear()
            rec = ModelRecord.model_validate_json(raw)
            labels = required_labels(rec) or None  # api > manifest
            parsed = (rec.size_bytes or rec.info.size_bytes or 0, *copies_bounds(rec), labels)  # api > manifest
            cache[raw] = parsed
        return parsed

    def per_model(self, ids: list[str]) -> dict[str, tuple[dict, dict, int]]:
        """model_id -> (raw copy records, raw failure records, queue depth): every model's, ~4
        commands each (what a run read before the change log; kept as the reference the
        incremental read is tested against)."""
        k, steps = self.keys, self.priority_steps
        out: dict[str, tuple[dict, dict, int]] = {}
        for chunk in _chunks(ids):
            with self.r.pipeline(transaction=False) as p:
                for m in chunk:
                    p.hgetall(k.copies(m))
                    p.hgetall(k.failures(m))
                    for key in k.queue_list_keys(k.model_queue(m), steps):
                        p.llen(key)
                flat = p.execute(raise_on_error=False)
            step = 2 + len(steps)
            for i, m in enumerate(chunk):
                row = flat[i * step : (i + 1) * step]
                for reply in row[:2]:
                    if isinstance(reply, Exception):
                        raise reply
                out[m] = (row[0], row[1], sum(list_length(x) for x in row[2:]))
        return out

    # --- the incremental read (mesh/store/changes.py; docs/scheduler.md, "Reading the cluster")
    def _registry(self) -> _Registry:
        """The registry as of now: the view kept from the last run of this process, brought
        up to date from the change log, plus one slice re-read in full (the backstop for a
        write that left no change entry: every model is re-read within `refresh_runs` runs).
        Everything is read afresh when there is no view, Redis is another server (or
        restarted: its run id), or the log was trimmed past where the view stopped."""
        server = str(self.r.info("server").get("run_id", ""))
        key = (self._where(), self.keys.prefix)
        view = self._registries.get(key)
        if view is not None and view.server == server:
            got = self.change_log.since(view.cursor)
            if got is not None:
                changed, view.cursor = got
                self._refresh(view, sorted(changed))
                self._refresh_slice(view)
                return view
        self._registries.pop(key, None)
        cursor = self.change_log.head()  # first: a change made while everything is read is read again
        view = _Registry(server=server, cursor=cursor)
        raw = {m.decode(): v for m, v in self.r.hgetall(self.keys.models).items()}
        self._refresh(view, sorted(raw), raw)  # queue depths come from the lists that exist
        self._registries[key] = view
        return view

    def _where(self) -> str:
        kw = self.r.connection_pool.connection_kwargs
        return f"{kw.get('host')}:{kw.get('port')}/{kw.get('db')}{kw.get('path', '')}"

    def _refresh(self, view: _Registry, ids: list[str], raw_records: dict[str, bytes] | None = None) -> None:
        """Read these models' record (unless given), copies and failures again."""
        k = self.keys
        for chunk in _chunks(ids):
            with self.r.pipeline(transaction=False) as p:
                for m in chunk:
                    if raw_records is None:
                        p.hget(k.models, m)
                    p.hgetall(k.copies(m))
                    p.hgetall(k.failures(m))
                flat = p.execute()
            step = 3 if raw_records is None else 2
            for i, m in enumerate(chunk):
                row = flat[i * step : (i + 1) * step]
                raw = row[0] if raw_records is None else raw_records[m]
                if raw is None:
                    view.drop(m)
                else:
                    view.put(m, self._parse_record(raw), row[-2], row[-1])

    def _refresh_slice(self, view: _Registry) -> None:
        """The backstop: the next slice of the registry (HSCAN), re-read in full."""
        count = max(self.slice_min, math.ceil(len(view.models) / self.refresh_runs))
        cursor, raw = self.r.hscan(self.keys.models, view.scan_cursor, count=count)
        records = {m.decode(): v for m, v in raw.items()}
        view.seen.update(records)
        self._refresh(view, sorted(records), records)
        view.scan_cursor = cursor
        if cursor == 0:  # a full round: what it never saw is gone (or was, and came back)
            unseen = sorted(set(view.models) - view.seen)
            view.seen = set()
            if unseen:
                self._refresh(view, unseen)

    def queue_depths(self) -> dict[str, int]:
        """model_id -> requests waiting, for the models with any: Redis deletes an empty list,
        so the model queue lists that exist are the non-empty ones (one SCAN of the keyspace,
        server-side, and one LLEN per queue found), not one LLEN per registered model."""
        k = self.keys
        found: dict[str, list[str]] = {}
        cursor = 0
        while True:
            cursor, batch = self.r.scan(cursor, match=k.model_queue_lists_pattern(), count=10_000, _type="list")
            for raw in batch:
                key = raw.decode("utf-8", "replace")
                parsed = k.model_of_queue_list(key)
                if parsed is not None:
                    found.setdefault(key, []).append(parsed[0])
            if cursor == 0:
                break
        depths: dict[str, int] = {}
        keys = sorted(found)
        for chunk in _chunks(keys):
            with self.r.pipeline(transaction=False) as p:
                for key in chunk:
                    p.llen(key)
                lengths = p.execute(raise_on_error=False)
            for key, n in zip(chunk, lengths):
                if isinstance(n, int) and n:
                    model_id = found[key][0]
                    depths[model_id] = depths.get(model_id, 0) + n
        return depths

    def usage(self) -> dict[str, tuple[float, float, float]]:
        """model_id -> (last_used, score, time of the score). Kept between runs while this
        process is the last that wrote it (`Keys.usage_stamp`); else read in full."""
        key = (self._where(), self.keys.prefix)
        cached = self._usages.get(key)
        if cached is not None and self.r.get(self.keys.usage_stamp) == self._stamp.encode():
            self._usage_read = False
            return cached
        self._usage_read = True
        out = {}
        for model_id, raw in self.r.hgetall(self.keys.usage).items():
            try:
                last_used, score, t = json.loads(raw)
                out[model_id.decode()] = (float(last_used), float(score), float(t))
            except (ValueError, TypeError):
                continue  # a malformed entry is only a lost hint
        self._usages[key] = out
        self._dirty[key] = set()
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
        """The cluster for one run: the registry from the change log (mesh/store/changes.py), the
        heartbeats, the queues that hold requests and the usage kept in memory. The models in
        the state are this process's view, updated in place by its next `read`: a caller keeps
        a state only until then."""
        # As `plan` does: a read allocates ~100,000 objects that live on (the view, the
        # heartbeats' copies) without cycles; the cyclic collector rescanned them all, many
        # times over, for nothing (a third of the read at 100,000 models).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._read(now, history_s, interval_s)
        finally:
            if enabled:
                gc.enable()

    def _read(self, now: float, history_s: float, interval_s: float) -> ClusterState:
        workers = self.workers()
        view = self._registry()
        depths = self.queue_depths()
        usage = self.usage()
        by_id = view.models
        dropped = None if self._usage_read else view.dropped
        models = view.listed()
        # the models a heartbeat names get their figures from `_update_usage`; the rest of the
        # usage decays here. A model with no usage keeps its view's zeros, except after a
        # reading of Redis's usage (another scheduler's: ours may hold entries it has not)
        # when every view is set again.
        keep_views = not self._usage_read
        seen = self._update_usage(workers, by_id, usage, now, interval_s, dropped, set_views=keep_views)
        view.dropped = set()
        decay = self.decay_s
        keeps: dict[float, float] = {}
        if keep_views:
            get_view = by_id.get
            for model_id in usage.keys() - seen:
                mv = get_view(model_id)
                if mv is None:
                    continue
                last_used, score, t = usage[model_id]
                keep = keeps.get(t)
                if keep is None:
                    keep = keeps[t] = math.exp(-max(0.0, now - t) / decay)
                mv.last_used = last_used
                mv.score = score * keep
        else:
            get = usage.get
            for mv in models:
                u = get(mv.model_id)
                if u is None:
                    mv.last_used = 0.0
                    mv.score = 0.0
                    continue
                last_used, score, t = u
                keep = keeps.get(t)
                if keep is None:
                    keep = keeps[t] = math.exp(-max(0.0, now - t) / decay)
                mv.last_used = last_used
                mv.score = score * keep
        for model_id in view.queued - depths.keys():
            mv = by_id.get(model_id)
            if mv is not None:
                mv.queue_depth = 0
        for model_id, depth in depths.items():
            mv = by_id.get(model_id)
            if mv is not None:
                mv.queue_depth = depth
        view.queued = set(depths)
        retiring = {m.decode() for m in self.r.hkeys(self.keys.draining)}
        return ClusterState(
            workers=workers, models=models, history=self.history(now - history_s), retiring=retiring
        )

    def read_everything(self, now: float, history_s: float, interval_s: float) -> ClusterState:
        """`read` as it was before the change log: every record, copy and failure record and
        queue of every registered model, ~4 commands per model. The reference the tests hold
        the incremental read to; not used by the scheduler."""
        workers = self.workers()
        records = self.records()
        ids = sorted(records)
        rows = self.per_model(ids)
        usage = self.usage()
        self._update_usage(workers, records, usage, now, interval_s)
        models = []
        for model_id in ids:
            size, min_copies, max_copies, labels = records[model_id]
            raw_copies, raw_failures, depth = rows[model_id]
            last_used, score, t = usage.get(model_id, (0.0, 0.0, now))
            models.append(
                RegisteredModel(
                    model_id=model_id, size=size, min_copies=min_copies, max_copies=max_copies,
                    copies=_copies(raw_copies), failures=_failures(raw_failures), queue_depth=depth,
                    last_used=last_used, score=score * math.exp(-max(0.0, now - t) / self.decay_s),
                    required_labels=labels,
                )
            )  # fmt: skip
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
        dropped: set[str] | None = None,
        set_views: bool = False,
    ) -> KeysView[str]:
        """Fold the heartbeats into each model's usage: its newest use, and an exponentially
        decayed request rate (time constant `usage_decay_s`) that survives its copies, so the
        planner knows what a model is worth after it was evicted (cortexlabs/cortex#619: the
        top N). `dropped`: the only models that may have left the registry since the last run
        (None: any). With `set_views` (`records` holds the planner's views), each view of a
        model a heartbeat names gets its newest use and its score as of `now`, as `_read` sets
        the others'. Returns the ids of the models the heartbeats name."""
        # one pass over the copies (100,000 at scale): per model its copy, or [summed rate,
        # newest use] when it has several
        seen: dict[str, Any] = {}
        get = seen.get
        for w in workers:
            for model_id, c in w.models.items():
                agg = get(model_id)
                if agg is None:
                    seen[model_id] = c
                elif type(agg) is list:
                    agg[0] += c.rate
                    if c.last_used > agg[1]:
                        agg[1] = c.last_used
                else:
                    seen[model_id] = [agg.rate + c.rate, max(agg.last_used, c.last_used)]
        key = (self._where(), self.keys.prefix)
        dirty = self._dirty.setdefault(key, set())
        mark = dirty.add
        keeps: dict[float, float] = {}  # most scores were last updated by the previous run: one exp
        decay, stamp_now, first = self.decay_s, round(now, 3), now - interval_s
        keep_now = math.exp(-max(0.0, now - stamp_now) / decay)  # what `_read` decays a new score by
        usage_get, record_of = usage.get, records.get
        for model_id, agg in seen.items():
            mv = record_of(model_id)
            if mv is None:
                continue
            if type(agg) is list:
                rate, used = agg
            else:
                rate, used = agg.rate, agg.last_used
            old = usage_get(model_id)
            if old is None:
                last_used, score, t = 0.0, 0.0, first
            else:
                last_used, score, t = old
                if rate == 0.0 and used <= last_used:  # unchanged: the stored score decays when read
                    if set_views:
                        keep = keeps.get(t)
                        if keep is None:
                            keep = keeps[t] = math.exp(-max(0.0, now - t) / decay)
                        mv.last_used = last_used
                        mv.score = score * keep
                    continue
            keep = keeps.get(t)
            if keep is None:
                keep = keeps[t] = math.exp(-max(0.0, now - t) / decay)
            # kept as Redis keeps it (rounded): the next run sees what a fresh read would (a
            # kept time is rounded already: rounding it again is the identity)
            last_used = round(used, 3) if used > last_used else last_used
            score = score * keep + rate * (1.0 - keep)
            usage[model_id] = (last_used, score, stamp_now)
            mark(model_id)
            if set_views:
                mv.last_used = last_used
                mv.score = score * keep_now
        candidates = usage if dropped is None else [m for m in dropped if m in usage]
        gone = [m for m in candidates if m not in records]
        for m in gone:
            del usage[m]
            dirty.discard(m)
        share = max(CHUNK, math.ceil(len(usage) / USAGE_PERSIST_RUNS))
        updates = {m: _usage_json(usage[m]) for m in (dirty.pop() for _ in range(min(share, len(dirty))))}
        try:
            with self.r.pipeline(transaction=False) as p:
                items = list(updates.items())
                for i in range(0, len(items), CHUNK):
                    p.hset(self.keys.usage, mapping=dict(items[i : i + CHUNK]))
                for chunk in _chunks(gone):
                    p.hdel(self.keys.usage, *chunk)
                p.set(self.keys.usage_stamp, self._stamp)  # our in-memory usage is Redis's now
                p.execute()
        except Exception:
            self._usages.pop(key, None)  # unsure what was written
            self._dirty.pop(key, None)
            raise
        return seen.keys()

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
        self._hdel_if(keys=[self.keys.copies(model_id), self.keys.changes], args=[worker, raw, guard, model_id])

    def clear_failure(self, model_id: str, worker: str, raw: str) -> None:
        """Delete the failure record the planner saw as `raw`."""
        self._hdel_if(keys=[self.keys.failures(model_id), self.keys.changes], args=[worker, raw, "", model_id])

    def mark_loading(self, model_id: str, worker: str, now: float) -> bool:
        """Record `worker`'s copy as LOADING and queue it on the worker's line of loads; False
        (nothing written) when the model was unregistered meanwhile or a copy record appeared."""
        record = CopyInfo(worker=worker, state=CopyState.LOADING, since=now).model_dump_json()
        if not self._mark_loading(
            keys=[self.keys.models, self.keys.copies(model_id), self.keys.changes], args=[model_id, worker, record]
        ):
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


def _usage_json(entry: tuple[float, float, float]) -> str:
    """`json.dumps(list(entry))`, at a fifth of its cost (the same text for finite floats)."""
    last_used, score, t = entry
    text = f"[{last_used!r}, {score!r}, {t!r}]"
    return json.dumps(list(entry)) if "n" in text else text  # inf, nan: json's spelling


def _past(a: PastAction) -> str:
    return json.dumps({"time": a.time, "op": a.op, "model_id": a.model_id, "worker": a.worker, "reason": a.reason})


def _worker_view(name: str, raw: bytes) -> WorkerView | None:
    """A heartbeat parsed whole."""
    try:
        d = _loads_fast(raw)
        return _view_of(name, d, {m["model_id"]: _copy_view(m) for m in d.get("models", ())})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# How pydantic writes a heartbeat's copies (`WorkerState.model_dump_json`: no spaces, fields in
# their declared order): `"models":[{"model_id":...},{"model_id":...}],"loading":...`. None of
# these byte strings can occur inside a JSON string (a quote there is escaped), so they mark
# the array and the boundaries of its entries exactly.
_MODELS_AT = b'"models":[{"model_id":'
_ENTRY_AT = b'{"model_id":'
_ENTRY_SEP = b'},{"model_id":'
_MODELS_END = b'}],"'


def _heartbeat_view(
    name: str, raw: bytes, before: dict[bytes, CopyView], parts: dict[bytes, CopyView]
) -> WorkerView | None:
    """`_worker_view(name, raw)`, parsing only the copies' entries that are not in `before`
    (this worker's entries in the last run, by their bytes); fills `parts` with this
    heartbeat's. When most entries are new (a first run) the heartbeat is parsed whole, as it
    is when it is not laid out as pydantic writes it."""
    start = raw.find(_MODELS_AT)
    end = raw.find(_MODELS_END, start) if start >= 0 else -1
    if end < 0:
        return _worker_view(name, raw)
    start += len(_MODELS_AT) - len(_ENTRY_AT)  # the first entry's '{'
    entries = raw[start + len(_ENTRY_AT) : end].split(_ENTRY_SEP)
    models: dict[str, CopyView] = {}
    try:
        if 4 * sum(map(before.__contains__, entries)) < 3 * len(entries):
            # over a quarter new: one parse of the whole is faster than one per entry
            d = _loads_fast(raw)
            listed = d.get("models", ())
            if len(listed) != len(entries):
                raise ValueError("not one array of copies")
            for part, m in zip(entries, listed):
                c = parts[part] = _copy_view(m)
                models[c.model_id] = c
        else:
            d = _loads_fast(raw[:start] + raw[end + 1 :])  # the heartbeat with no copies
            if d.get("models"):
                raise ValueError("not one array of copies")
            get = before.get
            for part in entries:
                c = get(part)
                if c is None:
                    c = _copy_view(_loads_fast(_ENTRY_AT + part + b"}"))
                parts[part] = c
                models[c.model_id] = c
        return _view_of(name, d, models)
    except (ValueError, KeyError, TypeError, AttributeError):
        parts.clear()
        return _worker_view(name, raw)  # decides (a layout this did not expect, or garbage)


def _copy_view(m: dict) -> CopyView:
    return CopyView(
        m["model_id"], int(m["size_bytes"]), float(m["last_used"]), float(m["loaded_at"]),
        float(m.get("request_rate", 0.0)),
    )  # fmt: skip


def _view_of(name: str, d: dict, models: dict[str, CopyView]) -> WorkerView:
    return WorkerView(
        name=name,
        capacity=int(d["capacity_bytes"]),
        used=int(d["used_bytes"]),
        models=models,
        loading=set(d.get("loading", ())),
        shutting_down=bool(d.get("shutting_down", False)),
        rate=float(d.get("request_rate", 0.0)),
        started_at=float(d["started_at"]),
        labels=dict(d.get("labels") or {}),
    )


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
