"""The control-plane state in Redis: registry, copies, failure records, load claims, heartbeats.

Every method is one atomic step (a Lua script or WATCH/MULTI) when it touches more than one
record, so concurrent producers, workers and the scheduler never see half a change.
Decisions (status, placement) are pure functions in mesh/policy/status.py and mesh/policy/placement.py;
this module only reads and writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, TypeVar

import redis

from mesh.errors import AlreadyExists, FailedPrecondition
from mesh.models import (
    CopyInfo,
    CopyState,
    FailedCopy,
    ModelInfo,
    ModelRecord,
    ModelSignature,
    ModelStatus,
    WorkerState,
)
from mesh.policy.labels import no_match_reason
from mesh.policy.placement import choose_worker, fresh_failures
from mesh.policy.precedence import required_labels
from mesh.policy.status import model_status
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import AS_LIST_LUA, BELL_TTL_MS, Keys
from mesh.settings import MeshSettings
from mesh.store.changes import log_changes, lua_log_change

log = logging.getLogger("mesh.store.state")


class Route(IntEnum):
    NOT_FOUND = 0
    SERVING = 1  # a live copy exists (loading or loaded): just enqueue
    CLAIMED = 2  # no copy and no load in progress: the caller must place a load
    PENDING = 3  # another client is placing a load right now
    QUEUE_FULL = 4  # max_queue_size requests already wait in Redis
    IDLE = 5  # asked with if_queued, and no request waits in Redis: nothing to load


# One round trip on the hot path. A claim whose holder is a dead worker is taken over, so a
# worker that died mid-load does not block the model until the claim's TTL runs out.
# With ARGV[7] = '1' (`route_and_place`) a claim also returns what placing the load reads: the
# record, the failure records, and each live worker's state and line of loads (entries since
# ARGV[9]; ARGV[8] is the line keys' prefix): {2, record, {worker, error, ...}, {name, state,
# line, ...}}; and SERVING returns {1, age}: how many milliseconds before ARGV[10] (now) the
# oldest live copy finished loading, -1 when none has yet. With ARGV[11] = '0' nothing is
# written (a producer whose Redis user may not write claims, docs/security.md): CLAIMED then
# means "nobody serves or loads it".
_ROUTE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local max_queue = tonumber(ARGV[5])
local depth = 0
for i = 6, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if max_queue > 0 and depth >= max_queue then return 4 end
local copies = redis.call('HGETALL', KEYS[2])
local serving, oldest = false, nil
for i = 1, #copies, 2 do
  if redis.call('EXISTS', ARGV[2] .. copies[i]) == 1 then
    if ARGV[7] ~= '1' then return 1 end
    serving = true
    local ok, c = pcall(cjson.decode, copies[i + 1])
    local since = ok and type(c) == 'table' and c.state == 'LOADED' and tonumber(c.since)
    if since and (oldest == nil or since < oldest) then oldest = since end
  end
end
if serving then
  if oldest == nil then return {1, -1} end
  return {1, math.floor(math.max(0, tonumber(ARGV[10]) - oldest) * 1000)}
end
local holder = redis.call('GET', KEYS[3])
if holder then
  if string.sub(holder, 1, 8) == 'pending:' or redis.call('EXISTS', ARGV[2] .. holder) == 1 then
    return 3
  end
end
if ARGV[6] == '1' and depth == 0 then return 5 end
if ARGV[11] ~= '0' then redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3]) end
if ARGV[7] ~= '1' then return 2 end
local workers = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local state = redis.call('GET', ARGV[2] .. w)
  if state then
    workers[#workers + 1] = w
    workers[#workers + 1] = state
    workers[#workers + 1] = redis.call('ZCOUNT', ARGV[8] .. w, ARGV[9], '+inf')
  end
end
return {2, redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGETALL', KEYS[4]), workers}
"""

# Move the messages named in ARGV out of list KEYS[1], in one pass over it (reroute_queued):
# ARGV[1] is the bells' TTL, ARGV[2] the number m of destinations, then one triple per message
# to move: the SHA1 of its raw form, its destination's index d (1..m) and its rewritten form.
# KEYS[2..m+1] are the destination lists, KEYS[m+2..2m+1] their bells (mesh/broker/transport.py).
# The list is read once, partitioned, and written back without the moved messages (order kept);
# each destination gets its messages at its consuming end (RPUSH, newest first, so the oldest
# is served first) and its bell rung. A message no longer in KEYS[1] (a worker took it meanwhile)
# is not moved. Returns the count moved per destination. One LREM per message, as before, was
# O(N) each: O(N^2) inside Redis for a long queue.
_MOVE_LUA = AS_LIST_LUA + """
local m = tonumber(ARGV[2])
local want = {}
for i = 3, #ARGV, 3 do
  local q = want[ARGV[i]]
  if not q then q = {}; want[ARGV[i]] = q end
  q[#q + 1] = i
end
local keep, out, counts, moved = {}, {}, {}, 0
for d = 1, m do out[d] = {}; counts[d] = 0 end
local queued = redis.pcall('LRANGE', KEYS[1], 0, -1)
if queued.err then return counts end  -- no longer a list (any producer may write it): nothing to move
for _, raw in ipairs(queued) do
  local q = want[redis.sha1hex(raw)]
  if q and #q > 0 then
    local i = table.remove(q)
    local d = tonumber(ARGV[i + 1])
    out[d][#out[d] + 1] = ARGV[i + 2]
    counts[d] = counts[d] + 1
    moved = moved + 1
  else
    keep[#keep + 1] = raw
  end
end
if moved == 0 then return counts end
local function push(key, items)
  for j = 1, #items, 1000 do
    redis.call('RPUSH', key, unpack(items, j, math.min(j + 999, #items)))
  end
end
redis.call('DEL', KEYS[1])
push(KEYS[1], keep)
for d = 1, m do
  if counts[d] > 0 then
    as_list(KEYS[1 + d])
    push(KEYS[1 + d], out[d])
    local bell = KEYS[1 + m + d]
    as_list(bell)
    redis.call('LPUSH', bell, 1)
    redis.call('LTRIM', bell, 0, 0)
    redis.call('PEXPIRE', bell, ARGV[1])
  end
end
return counts
"""

# A worker reports a copy only while the model is still registered: an unregister that raced
# with the load must not leave a copy record behind. A LOADED copy also leaves the worker's
# line of loads (Keys.load_line).
_MARK_COPY_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[4], ARGV[2])
  local holder = redis.call('GET', KEYS[3])
  if holder == ARGV[2] then redis.call('DEL', KEYS[3]) end
  redis.call('ZREM', KEYS[5], ARGV[1])
end
""" + lua_log_change("KEYS[6]", "ARGV[1]") + """
return 1
"""

# A placement undone (`unplace`): the copy record only while it is the LOADING one a placement
# writes (a copy the worker marked LOADED came from a load it did; a record that is no JSON
# object is left as it is), the claim only while it names the worker, the worker's line entry.
# A key of another type there (any writer of these keys could leave one) is passed over.
_UNPLACE_LUA = """
local copy = redis.pcall('HGET', KEYS[1], ARGV[1])
if type(copy) == 'string' then
  local ok, rec = pcall(cjson.decode, copy)
  if ok and type(rec) == 'table' and rec.state == 'LOADING' then redis.call('HDEL', KEYS[1], ARGV[1]) end
end
if redis.pcall('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.pcall('ZREM', KEYS[3], ARGV[2])
""" + lua_log_change("KEYS[4]", "ARGV[2]") + """
return 1
"""

# The models whose queue holds requests, among those whose lists are KEYS (ARGV[1] lists per
# model, in order): a flat array of {index, depth} for those only.
# A key of another type (any producer may write a queue's lists) counts as empty: the pop
# script skips it too.
_QUEUED_LUA = """
local out, n = {}, tonumber(ARGV[1])
for i = 1, #KEYS, n do
  local depth = 0
  for j = i, i + n - 1 do
    local len = redis.pcall('LLEN', KEYS[j])
    if type(len) == 'number' then depth = depth + len end
  end
  if depth > 0 then
    out[#out + 1] = (i - 1) / n
    out[#out + 1] = depth
  end
end
return out
"""

# Release a leader lock only if we still hold it: a run that outlived its lease must not delete
# the next holder's lock (the scheduler's and the repository sync's locks).
_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A load asked of the workers (`want_load`), the list kept to ARGV[2] entries. Any producer may
# write the list: one holding another type failed every restricted producer's cold request
# (WRONGTYPE) until an operator deleted it; it is replaced, and the reply says so.
_WANT_LUA = AS_LIST_LUA + """
local replaced = as_list(KEYS[1])
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
return replaced
"""

# The wanted list deleted if it is not a list (a worker whose wait on it failed); its type.
_DROP_UNLESS_LIST_LUA = AS_LIST_LUA + "return as_list(KEYS[1])"

PENDING_CLAIM_MS = 5000
# parsed heartbeats and records kept for placement (`StateStore._parsed`), cleared past this:
# a few per worker and per model in the minutes around now
PARSED_MAX = 512
_M = TypeVar("_M", WorkerState, ModelRecord)
WANTED_MAX = 10_000  # hints a flood of cold requests (or a hostile producer) can leave waiting
QUEUE_LISTS_REMEMBERED = 20_000  # models whose queue lists a store keeps named (`_queue_lists`)


def wrong_type(exc: BaseException) -> bool:
    """Whether Redis refused a command because its key holds another type (WRONGTYPE; a
    pipeline's error names the command before Redis's words)."""
    return isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc)


def list_length(reply: object) -> int:
    """An LLEN's reply from a pipeline run with `raise_on_error=False`. A queue's list holding
    another type (any producer may write one; the pop script skips it) counts as empty: it
    failed every depth read that named it, the orphan watch's and the scheduler's for every
    model at once. A connection error still raises."""
    if isinstance(reply, int):
        return reply
    if isinstance(reply, Exception) and wrong_type(reply):
        return 0
    if isinstance(reply, Exception):
        raise reply
    return 0


@dataclass(frozen=True)
class Placement:
    worker: str | None
    error: str | None = None  # set when the model failed everywhere it may load
    # set when live workers are up but none carries the model's required labels
    # (mesh/policy/labels.py `no_match_reason`): its requests wait for a worker of its pool
    unmatched: str | None = None


class Routed(NamedTuple):
    """`StateStore.route_and_place`'s answer."""

    route: Route
    placement: Placement | None = None  # set when the route claimed the load
    # SERVING: seconds since the oldest live copy finished loading (None: all still loading)
    loaded_for: float | None = None


class StateStore:
    def __init__(self, client: redis.Redis, keys: Keys, settings: MeshSettings) -> None:
        self.r = client
        self.keys = keys
        self.settings = settings
        self._route = client.register_script(_ROUTE_LUA)
        # The same route, its keys named in the last argument instead of KEYS: Redis 7 asks
        # read *and* write rights for every key a script declares, so a producer user that may
        # only read the registry could not run the declared form (docs/security.md).
        self._route_read_only = client.register_script("local KEYS = cjson.decode(ARGV[#ARGV])\n" + _ROUTE_LUA)
        self._mark_copy = client.register_script(_MARK_COPY_LUA)
        self._unplace = client.register_script(_UNPLACE_LUA)
        self._move = client.register_script(_MOVE_LUA)
        self._release_lock = client.register_script(_RELEASE_LOCK_LUA)
        self._queued = client.register_script(_QUEUED_LUA)
        self._want = client.register_script(_WANT_LUA)
        self._drop_unless_list = client.register_script(_DROP_UNLESS_LIST_LUA)
        # model id -> its queue's Redis lists (`_queue_lists`)
        self._lists_of: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        # JSON read for placement -> what it parsed to (`_parsed`)
        self._parsed_states: dict[bytes, WorkerState] = {}
        self._parsed_records: dict[bytes, ModelRecord] = {}

    @staticmethod
    def _parsed(cache: dict[bytes, _M], model: type[_M], raw: bytes) -> _M:
        """`model.model_validate_json(raw)`, one object for the same bytes, for placement only
        (which reads them and changes nothing). Every cold route reads each worker's heartbeat
        and the model's record; a heartbeat changes once an interval, and parsing one of a
        worker holding twenty models took ~50 us, twice per cold request (closedloop zipf:
        ~6 % of a producer's interpreter time). Plain dict operations: safe between threads."""
        parsed = cache.get(raw)
        if parsed is None:
            parsed = model.model_validate_json(raw)
            if len(cache) >= PARSED_MAX:
                cache.clear()
            cache[raw] = parsed
        return parsed

    def _queue_lists(self, model_id: str, priority_steps: list[int]) -> list[str]:
        """The Redis lists of a model's queue, one per priority step, remembered: a worker's
        watch of the models that left it names the same few hundred 40 times a second, and
        building their names (the id's check and encoding) was a third of its cost (`queued`
        of 60 models: ~410-500 -> ~300-350 us)."""
        key = (model_id, tuple(priority_steps))
        lists = self._lists_of.get(key)
        if lists is None:
            if len(self._lists_of) >= QUEUE_LISTS_REMEMBERED:
                self._lists_of.clear()
            lists = self._lists_of[key] = self.keys.queue_list_keys(self.keys.model_queue(model_id), priority_steps)
        return lists

    # ------------------------------------------------------------------ registry
    def register_model(
        self, model_id: str, info: ModelInfo, *, auto_delete: bool = False
    ) -> tuple[ModelRecord, bool]:
        """Create the record; identical info is idempotent, different info is ALREADY_EXISTS."""
        validate_id(model_id)
        new = ModelRecord(model_id=model_id, info=info, auto_delete=auto_delete)
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(self.keys.models)
                    raw = p.hget(self.keys.models, model_id)
                    if raw is not None:
                        rec = ModelRecord.model_validate_json(raw)
                        if rec.info.same_model(info):
                            p.reset()
                            return rec, False
                        raise AlreadyExists(
                            f"model {model_id!r} already exists with different info "
                            "(models are immutable: register a new id)"
                        )
                    p.multi()
                    p.hset(self.keys.models, model_id, new.model_dump_json())
                    log_changes(p, self.keys.changes, [model_id])
                    p.execute()
                    return new, True
                except redis.WatchError:
                    continue

    def unregister_model(self, model_id: str) -> list[str]:
        """Delete the record and its copies/failures; returns the workers that held a copy.

        Idempotent when absent. FAILED_PRECONDITION while a vmodel references the model.
        """
        return self.unregister(model_id)[1]

    def unregister(self, model_id: str) -> tuple[ModelRecord | None, list[str]]:
        """`unregister_model`, with the record deleted (None when there was none): its
        `created_at` is the generation the unload commands name (Command.generation)."""
        validate_id(model_id)
        k = self.keys
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(k.models, k.copies(model_id))
                    raw = p.hget(k.models, model_id)
                    if raw is None:
                        p.reset()
                        return None, []
                    rec = ModelRecord.model_validate_json(raw)
                    if rec.refs > 0:
                        raise FailedPrecondition(
                            f"model {model_id!r} has referents ({rec.refs} vmodel reference(s))"
                        )
                    holders = [w.decode() for w in p.hkeys(k.copies(model_id))]
                    p.multi()
                    p.hdel(k.models, model_id)
                    p.zadd(k.gone, {model_id: time.time()})  # its queue is watched for strays (mesh/store/strays.py)
                    p.hdel(k.signatures, model_id)
                    p.delete(k.copies(model_id), k.failures(model_id), k.load_claim(model_id),
                             k.queue_bell(k.model_queue(model_id)), *k.queue_bindings(k.model_queue(model_id)))
                    log_changes(p, k.changes, [model_id])
                    p.execute()
                    return rec, holders
                except redis.WatchError:
                    continue

    def get_record(self, model_id: str) -> ModelRecord | None:
        raw = self.r.hget(self.keys.models, model_id)
        return None if raw is None else ModelRecord.model_validate_json(raw)

    def list_records(self) -> list[ModelRecord]:
        raw = self.r.hgetall(self.keys.models)
        return sorted(
            (ModelRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.model_id
        )

    def set_size(self, model_id: str, size_bytes: int) -> None:
        """Remember the measured size for placement.

        The record also holds reference counts that vmodel transactions change concurrently:
        a plain read-modify-write here could put back a stale count, so it is one WATCH/MULTI
        step like theirs."""

        def write(p: redis.client.Pipeline) -> None:
            raw = p.hget(self.keys.models, model_id)
            if raw is None:
                return
            rec = ModelRecord.model_validate_json(raw)
            if rec.size_bytes != size_bytes:
                rec.size_bytes = size_bytes
                p.multi()
                p.hset(self.keys.models, model_id, rec.model_dump_json())
                log_changes(p, self.keys.changes, [model_id])

        self.r.transaction(write, self.keys.models)

    # ------------------------------------------------------------------ signatures
    def set_signature(self, model_id: str, signature: ModelSignature) -> None:
        """Record a loaded model's signature (models are immutable: every copy measures the same)."""
        self.r.hset(self.keys.signatures, model_id, signature.model_dump_json())

    def get_signature(self, model_id: str, generation: float | None = None) -> ModelSignature | None:
        """The recorded signature; None when none was recorded for that registration."""
        raw = self.r.hget(self.keys.signatures, model_id)
        if raw is None:
            return None
        signature = ModelSignature.model_validate_json(raw)
        if generation is not None and signature.generation != generation:
            return None  # measured for an earlier registration of the same id
        return signature

    # ------------------------------------------------------------------ status
    def model_status(self, model_id: str) -> ModelStatus:
        validate_id(model_id)
        k = self.keys
        with self.r.pipeline(transaction=False) as p:
            p.hget(k.models, model_id)
            p.hgetall(k.copies(model_id))
            p.hgetall(k.failures(model_id))
            p.get(k.load_claim(model_id))
            raw_record, raw_copies, raw_fail, claim = p.execute()
        copies = [CopyInfo.model_validate_json(v) for v in raw_copies.values()]
        failures = [FailedCopy.model_validate_json(v) for v in raw_fail.values()]
        holders = {c.worker for c in copies}
        claim_holder = claim.decode() if claim else None
        if claim_holder and not claim_holder.startswith("pending:"):
            holders.add(claim_holder)
        live = self.alive(holders)
        claimed = claim_holder is not None and (
            claim_holder.startswith("pending:") or claim_holder in live
        )
        unservable = None
        if raw_record is not None and not any(c.worker in live for c in copies):
            required = required_labels(ModelRecord.model_validate_json(raw_record))
            if required:  # only then: a status costs one more read, of every worker's heartbeat
                unservable = no_match_reason(
                    required, (w.labels for w in self.live_workers() if not w.shutting_down)
                )
        return model_status(
            model_id,
            registered=raw_record is not None,
            unservable=unservable,
            copies=copies,
            failures=failures,
            live_workers=live,
            load_claimed=claimed,
            now=time.time(),
            load_failure_expiry_s=self.settings.load_failure_expiry_s,
        )

    # ------------------------------------------------------------------ cold path
    def route(
        self, model_id: str, claimant: str, *, max_queue: int = 0, priority_steps: list[int] = (0,),
        if_queued: bool = False, claim: bool = True,
    ) -> Route:  # fmt: skip
        """One round trip: exists? queue full? a live copy? else claim the load (with `claim`
        False: write nothing, and CLAIMED means nobody serves or loads the model).

        `if_queued`: claim only while requests wait in the model's queue (else Route.IDLE). For
        a worker's orphan watch, whose read of the queue's depth is a round trip older: a copy
        leaving may have answered those requests meanwhile, and a load then would be for
        nothing.
        """
        return self._route_call(model_id, claimant, max_queue, priority_steps, if_queued, None, claim).route

    def route_and_place(
        self, model_id: str, claimant: str, *, max_queue: int = 0, priority_steps: list[int] = (0,),
        if_queued: bool = False, exclude: Iterable[str] = (), claim: bool = True,
    ) -> Routed:  # fmt: skip
        """`route`, and when it claims the load, `place_load` too, on what the same round trip
        read: two round trips for a cold request instead of four (closedloop zipf: a fifth of
        the requests are cold, and each round trip of a busy producer costs milliseconds).
        SERVING also says how long the oldest live copy has been LOADED (`loaded_for`).
        With `claim` False nothing is written: CLAIMED comes without a placement."""
        return self._route_call(model_id, claimant, max_queue, priority_steps, if_queued, exclude, claim)

    def _route_call(
        self, model_id: str, claimant: str, max_queue: int, priority_steps: Iterable[int], if_queued: bool,
        exclude: Iterable[str] | None, claim: bool = True,
    ) -> Routed:  # fmt: skip
        k = self.keys
        now = time.time()
        queue_keys = (
            k.queue_list_keys(k.model_queue(model_id), list(priority_steps)) if max_queue or if_queued else []
        )
        keys = [k.models, k.copies(model_id), k.load_claim(model_id), k.failures(model_id), k.workers, *queue_keys]
        args = [model_id, k.worker_key_prefix, PENDING_CLAIM_MS, f"pending:{claimant}", max_queue,
                "1" if if_queued else "0", "0" if exclude is None else "1",
                k.load_line(""), now - self.settings.load_timeout_s, now, "1" if claim else "0"]  # fmt: skip
        if claim:
            out = self._route(keys=keys, args=args)
        else:
            out = self._route_read_only(keys=[], args=[*args, json.dumps(keys)])
        if not isinstance(out, list):
            return Routed(Route(int(out)))
        if int(out[0]) == Route.SERVING:
            age_ms = int(out[1])
            return Routed(Route.SERVING, loaded_for=None if age_ms < 0 else age_ms / 1000)
        if not claim:
            return Routed(Route.CLAIMED)
        _, raw, raw_failures, flat = out
        workers = sorted(
            ((flat[i].decode(), self._parsed(self._parsed_states, WorkerState, flat[i + 1]), int(flat[i + 2]))
             for i in range(0, len(flat), 3)),
            key=lambda w: w[0],
        )  # fmt: skip
        placement = self._place(
            model_id, raw, raw_failures[1::2], [w for _, w, _ in workers], {n: line for n, _, line in workers},
            exclude, now,
        )  # fmt: skip
        return Routed(Route.CLAIMED, placement)

    def unplace(self, model_id: str, worker: str) -> None:
        """Undo a placement on `worker` whose load command could not be sent (`route_and_place`
        wrote the LOADING copy, the claim and the line entry; the worker never heard of it):
        left in place, they held the model as loading on `worker`, and its requests waited for
        a load nobody ran until the claim expired (a load timeout and 5 s)."""
        k = self.keys
        self._unplace(keys=[k.copies(model_id), k.load_claim(model_id), k.load_line(worker), k.changes],
                      args=[worker, model_id])  # fmt: skip

    def want_load(self, model_id: str) -> None:
        """Ask the workers to load a model nobody serves or loads (a producer that may not
        place loads itself, docs/security.md): one LPUSH on the list they wait on, kept to
        WANTED_MAX entries (a hint: the worker that pops it routes and places as a producer
        would, and drops it if the model is served or loading by then). A key of another type
        in its place (any producer may write it) is replaced."""
        replaced = self._want(keys=[self.keys.wanted], args=[model_id, WANTED_MAX])
        if replaced:
            log.error("replaced %s: it held a %s, not a list", self.keys.wanted, replaced.decode("utf-8", "replace"))

    def pop_wanted(self, timeout_s: float) -> str | None:
        """The oldest model a producer asked to load, waiting up to `timeout_s` (a worker). A
        key of another type in the list's place is deleted (else every wait failed until a
        producer's next `want_load` replaced it)."""
        try:
            popped = self.r.brpop([self.keys.wanted], timeout=timeout_s)
        except redis.ResponseError as exc:
            if not wrong_type(exc):
                raise
            dropped = self._drop_unless_list(keys=[self.keys.wanted])
            if not dropped:
                raise
            log.error("deleted %s: it held a %s, not a list", self.keys.wanted, dropped.decode("utf-8", "replace"))
            return None
        return None if popped is None else popped[1].decode("utf-8", "replace")

    def place_load(self, model_id: str, *, exclude: Iterable[str] = ()) -> Placement:
        """Pick a worker for a new copy and record the copy as LOADING under a claim.

        The caller holds the model's load claim (from `route`) or is a worker retrying a failed
        load elsewhere. Returns Placement(None, error) when every live worker failed this model
        recently (fail fast with the newest error), Placement(None) when no worker is up.
        Three round trips (`route_and_place` needs one after its route).
        """
        k = self.keys
        now = time.time()
        with self.r.pipeline(transaction=False) as p:
            p.hget(k.models, model_id)
            p.hgetall(k.failures(model_id))
            p.smembers(k.workers)
            raw, raw_failures, names = p.execute()
        if raw is None:
            self.r.delete(k.load_claim(model_id))
            return Placement(None)
        workers, lines = self._workers_and_lines(sorted(n.decode() for n in names), now)
        return self._place(model_id, raw, raw_failures.values(), workers, lines, exclude, now)

    def _place(
        self, model_id: str, raw: bytes | None, raw_failures: Iterable[bytes], workers: list[WorkerState],
        lines: dict[str, int], exclude: Iterable[str], now: float,
    ) -> Placement:  # fmt: skip
        """Choose the worker (mesh.policy.placement) on what was read, and record the copy as
        LOADING, the claim and the worker's line of loads: one round trip."""
        k = self.keys
        if raw is None:
            self.r.delete(k.load_claim(model_id))
            return Placement(None)
        rec = self._parsed(self._parsed_records, ModelRecord, raw)
        failures = [FailedCopy.model_validate_json(v) for v in raw_failures]
        fresh = fresh_failures(failures, now, self.settings.load_failure_expiry_s)
        size = rec.size_bytes or rec.info.size_bytes or 0
        required = required_labels(rec)
        unmatched = no_match_reason(required, (w.labels for w in workers if not w.shutting_down))
        chosen = None
        if unmatched is None and len(fresh) < self.settings.max_load_attempts:
            chosen = choose_worker(
                workers, model_id=model_id, failed_on=[f.worker for f in fresh], exclude=exclude,
                size_hint=size, backlog=lines, required_labels=required,
            )  # fmt: skip
        if chosen is None:
            self.r.delete(k.load_claim(model_id))
            if unmatched is not None:
                return Placement(None, unmatched=unmatched)
            return Placement(None, fresh[0].error if fresh else None)
        copy = CopyInfo(worker=chosen, state=CopyState.LOADING, since=now)
        with self.r.pipeline() as p:
            p.hset(k.copies(model_id), chosen, copy.model_dump_json())
            p.set(k.load_claim(model_id), chosen, px=self._load_ttl_ms())
            self.add_to_load_line(p, chosen, model_id, now)
            log_changes(p, k.changes, [model_id])
            p.execute()
        return Placement(chosen)

    def _load_ttl_ms(self) -> int:
        return int(self.settings.load_timeout_s * 1000) + 5000

    def add_to_load_line(self, pipe: redis.client.Pipeline, worker: str, model_id: str, now: float) -> None:
        """Queue `model_id` on `worker`'s line of loads (in the caller's pipeline, with the
        load command's bookkeeping). The worker takes it off when the copy is LOADED
        (mark_copy), fails or goes (remove_copy, record_failure); a worker that dies takes
        its line with it (the key expires; entries older than a load's timeout never count)."""
        line = self.keys.load_line(worker)
        pipe.zadd(line, {model_id: now})
        pipe.pexpire(line, self._load_ttl_ms())

    def _workers_and_lines(self, names: list[str], now: float) -> tuple[list[WorkerState], dict[str, int]]:
        """Live workers' states and the length of each one's line of loads, in one round trip.
        The heartbeat's list of loads is up to an interval old; a line grows by tens of loads
        a second under churn, so placement reads it live."""
        if not names:
            return [], {}
        since = now - self.settings.load_timeout_s
        with self.r.pipeline(transaction=False) as p:
            p.mget([self.keys.worker(n) for n in names])
            for n in names:
                p.zcount(self.keys.load_line(n), since, "+inf")
            raw, *counts = p.execute()
        workers = [self._parsed(self._parsed_states, WorkerState, v) for v in raw if v is not None]
        return workers, dict(zip(names, counts))

    # ------------------------------------------------------------------ worker reports
    def mark_copy(self, model_id: str, worker: str, state: CopyState, *, ring: str | None = None) -> bool:
        """Record this worker's copy; False when the model is no longer registered.

        `ring`: a queue whose bell (mesh/broker/transport.py) rings in the same round trip: a worker
        that starts consuming a model's queue rings its own command queue, so its consumer's
        wait returns and takes the new queue into the next one.
        """
        if ring is None:
            return bool(self._mark_copy(**self._mark_copy_args(model_id, worker, state)))
        call = self._mark_copy_args(model_id, worker, state)

        def build(p: redis.client.Pipeline) -> None:
            _evalsha(p, self._mark_copy, call)
            self._ring(p, ring)

        return bool(_run_with_script(self.r, self._mark_copy, build)[0])

    def _ring(self, pipe: redis.client.Pipeline, queue: str) -> None:
        bell = self.keys.queue_bell(queue)
        pipe.lpush(bell, 1)
        pipe.ltrim(bell, 0, 0)
        pipe.pexpire(bell, BELL_TTL_MS)

    def begin_load(self, model_id: str, worker: str, *, ring: str | None = None) -> ModelRecord | None:
        """The model's record, and this worker's copy marked LOADING, in one round trip; None
        (and nothing marked) when the model is not registered. `ring`: as for `mark_copy` (the
        worker consumes a model's queue from the start of its load)."""
        call = self._mark_copy_args(model_id, worker, CopyState.LOADING)

        def build(p: redis.client.Pipeline) -> None:
            p.hget(self.keys.models, model_id)
            _evalsha(p, self._mark_copy, call)
            if ring is not None:
                self._ring(p, ring)

        raw = _run_with_script(self.r, self._mark_copy, build)[0]
        return None if raw is None else ModelRecord.model_validate_json(raw)

    def _mark_copy_args(self, model_id: str, worker: str, state: CopyState) -> dict:
        k = self.keys
        copy = CopyInfo(worker=worker, state=state, since=time.time())
        return {
            "keys": [k.models, k.copies(model_id), k.load_claim(model_id), k.failures(model_id),
                     k.load_line(worker), k.changes],
            "args": [model_id, worker, copy.model_dump_json(), "1" if state is CopyState.LOADED else "0"],
        }

    def remove_copy(self, model_id: str, worker: str) -> None:
        """The worker holds no copy (evicted, unloaded, or a load given up)."""
        with self.r.pipeline(transaction=False) as p:
            p.hdel(self.keys.copies(model_id), worker)
            p.zrem(self.keys.load_line(worker), model_id)
            log_changes(p, self.keys.changes, [model_id])  # after the write: see mesh/store/changes.py
            p.execute()

    def record_failure(self, model_id: str, worker: str, error: str) -> None:
        k = self.keys
        rec = FailedCopy(worker=worker, error=error, time=time.time())
        with self.r.pipeline() as p:
            p.hdel(k.copies(model_id), worker)
            p.hset(k.failures(model_id), worker, rec.model_dump_json())
            p.zrem(k.load_line(worker), model_id)
            log_changes(p, k.changes, [model_id])
            p.execute()

    def release_claim(self, model_id: str, holder: str | None = None) -> None:
        key = self.keys.load_claim(model_id)
        if holder is None or self.r.get(key) == holder.encode():
            self.r.delete(key)

    # ------------------------------------------------------------------ workers
    def write_heartbeat(self, state: WorkerState, ttl_s: float) -> None:
        with self.r.pipeline(transaction=False) as p:
            p.set(self.keys.worker(state.name), state.model_dump_json(), px=int(ttl_s * 1000))
            p.sadd(self.keys.workers, state.name)
            p.execute()

    def remove_worker(self, name: str, models: Iterable[str] = ()) -> None:
        """A worker leaving cleanly: its copies and heartbeat go at once."""
        models = list(models)
        with self.r.pipeline() as p:
            for m in models:
                p.hdel(self.keys.copies(m), name)
            p.delete(self.keys.worker(name), self.keys.load_line(name))
            p.srem(self.keys.workers, name)
            log_changes(p, self.keys.changes, models)
            p.execute()

    def worker_state(self, name: str) -> WorkerState | None:
        """The worker's last heartbeat, or None while it has none (not up yet, or dead)."""
        raw = self.r.get(self.keys.worker(name))
        return None if raw is None else WorkerState.model_validate_json(raw)

    def delete_all(self) -> int:
        """Delete every key of this mesh (its prefix: state, queues, results); for a mesh made
        for one run (the demo's). Returns how many keys went."""
        deleted = 0
        for pattern in (f"{self.keys.prefix}:*", f"{self.keys.prefix}.*"):
            keys = list(self.r.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                deleted += self.r.delete(*keys[i : i + 500])
        return deleted

    def live_workers(self) -> list[WorkerState]:
        names = sorted(n.decode() for n in self.r.smembers(self.keys.workers))
        if not names:
            return []
        raw = self.r.mget([self.keys.worker(n) for n in names])
        return [WorkerState.model_validate_json(v) for v in raw if v is not None]

    def alive(self, names: Iterable[str]) -> set[str]:
        names = list(names)
        if not names:
            return set()
        with self.r.pipeline(transaction=False) as p:
            for n in names:
                p.exists(self.keys.worker(n))
            flags = p.execute()
        return {n for n, f in zip(names, flags) if f}

    # ------------------------------------------------------------------ locks and status
    def release_lock(self, key: str, token: str) -> bool:
        """Release the lock at `key` if `token` still holds it."""
        return bool(self._release_lock(keys=[key], args=[token]))

    def last_rebalance(self) -> bytes | None:
        """The last scheduler run's report as it stored it (mesh/store/cluster.py, save_report)."""
        return self.r.get(self.keys.rebalance_last)

    # ------------------------------------------------------------------ queues
    def reroute_queued(
        self, model_id: str, priority_steps: list[int], destination: Callable[[dict], str | None]
    ) -> dict[str, int]:
        """Move the requests queued for `model_id` to the queue of `destination(message)` (a
        model id, or None to leave a message where it is); returns the count moved per model.

        Each priority step moves in one atomic step (a message is in exactly one of the two
        queues, whatever interrupts the move) and in O(N): one read of the queue, one script
        that partitions it. A message keeps its priority and is served before what was already
        queued there: it waited longer.
        The worker takes a message's model from its routing key, rewritten here."""
        k = self.keys
        src_keys = k.queue_list_keys(k.model_queue(model_id), priority_steps)
        moved: dict[str, int] = {}
        for step, src in enumerate(src_keys):
            targets: dict[str, int] = {}  # destination model -> its index in the script's keys
            args: list[bytes | str | int] = []
            try:
                queued = self.r.lrange(src, 0, -1)  # a snapshot: the script moves what is still there
            except redis.ResponseError as exc:
                if not wrong_type(exc):
                    raise
                continue  # not a list (any producer may write it): it holds no request to move
            for raw in queued:
                try:
                    message = json.loads(raw)
                    dst_model = destination(message)
                    if dst_model is None or dst_model == model_id:
                        continue
                    queue = k.model_queue(validate_id(dst_model))
                    message["properties"]["delivery_info"]["routing_key"] = queue
                    if "mm-model-id" in (message.get("headers") or {}):
                        message["headers"]["mm-model-id"] = dst_model
                except (ValueError, TypeError, AttributeError, KeyError):
                    continue  # not a request envelope: left for the worker to refuse
                index = targets.setdefault(dst_model, len(targets) + 1)
                args += [hashlib.sha1(raw).hexdigest(), index, json.dumps(message)]
            if not targets:
                continue
            queues = [k.model_queue(m) for m in targets]
            counts = self._move(
                keys=[src, *(k.queue_list_keys(q, priority_steps)[step] for q in queues),
                      *(k.queue_bell(q) for q in queues)],
                args=[BELL_TTL_MS, len(targets), *args],
            )  # fmt: skip
            for dst_model, count in zip(targets, counts):
                if count:
                    moved[dst_model] = moved.get(dst_model, 0) + int(count)
        return moved

    def queue_depth(self, model_id: str, priority_steps: list[int]) -> int:
        return self.queue_depths([model_id], priority_steps)[model_id]

    def queue_depths(self, model_ids: list[str], priority_steps: list[int]) -> dict[str, int]:
        """Requests waiting per model, in one round trip for all of them (a worker watches
        hundreds of queues under churn)."""
        with self.r.pipeline(transaction=False) as p:
            for m in model_ids:
                for key in self._queue_lists(m, priority_steps):
                    p.llen(key)
            flat = p.execute(raise_on_error=False)
        n = len(priority_steps)
        return {m: sum(list_length(x) for x in flat[i * n : (i + 1) * n]) for i, m in enumerate(model_ids)}

    def queued(self, model_ids: list[str], priority_steps: list[int]) -> dict[str, int]:
        """The models among `model_ids` with requests waiting, and how many: `queue_depths` for
        a worker's watch of the models that left it, many times a second over up to hundreds
        of queues, nearly all empty: one script call, whose reply names only the others."""
        if not model_ids:
            return {}
        lists = [key for m in model_ids for key in self._queue_lists(m, priority_steps)]
        flat = self._queued(keys=lists, args=[len(priority_steps)])
        return {model_ids[int(flat[i])]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def copies_recorded(self, model_ids: list[str], worker: str) -> dict[str, bool]:
        """Whether `worker`'s copy of each model has a record, in one round trip."""
        with self.r.pipeline(transaction=False) as p:
            for model_id in model_ids:
                p.hexists(self.keys.copies(model_id), worker)
            return dict(zip(model_ids, map(bool, p.execute())))

    def clear_load_line(self, worker: str) -> None:
        """Forget a worker's line of loads (left by an earlier process of the same name)."""
        self.r.delete(self.keys.load_line(worker))


# ---------------------------------------------------------------------- scripts in pipelines
def _evalsha(pipe: redis.client.Pipeline, script: redis.commands.core.Script, call: dict) -> None:
    """Queue `script` on `pipe` by its sha alone. Through `script(..., client=pipe)` redis-py
    asks Redis whether the pipeline's scripts exist (SCRIPT EXISTS) before every execute: a
    round trip more, on a load's path twice (begin_load, mark_copy), each one waiting for the
    interpreter lock in a busy worker. `_run_with_script` loads the script when Redis lacks it."""
    keys, args = call["keys"], call["args"]
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def _run_with_script(client: redis.Redis, script: redis.commands.core.Script,
                     build: Callable[[redis.client.Pipeline], None]) -> list:  # fmt: skip
    """Execute the pipeline `build` fills (with `_evalsha` calls of `script`); if Redis does
    not have the script (restarted, SCRIPT FLUSH), load it and run the pipeline again: nothing
    of a pipeline whose script was missing needs undoing (its other commands are reads and
    idempotent writes)."""
    for attempt in (1, 2):
        with client.pipeline(transaction=False) as p:
            build(p)
            try:
                return p.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
        script.sha = client.script_load(script.script)
    raise AssertionError("unreachable")
