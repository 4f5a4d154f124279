"""Failover and dead letters: the broker's bookkeeping of delivered messages, read and acted on
by live workers and by the `mesh` CLI.

mesh/broker/transport.py's pop script records, for every message it delivers, which consumer
process holds it (its *holder* id, unique per process) and where it came from. A holder's
alive key lives as long as its heartbeat (refreshed by `beat`, same TTL). When it expires, the
next live worker's heartbeat duty (`FailoverStore.beat`, then `restore_holder`) puts the dead
holder's unacked messages back on their queues at once, instead of after kombu's visibility
timeout (which stays as the backstop for a holder that is alive but stuck). A message that
comes back too often (the pop script counts) is dead-lettered; `dead_letters`, `requeue` and
`purge` are the operator's side (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

import json
from typing import NamedTuple

import redis
from pydantic import BaseModel

from mesh.protocol.keys import AS_LIST_LUA, BELL_TTL_MS, KOMBU_PRIORITY_SEP, Keys, queue_bell

# The caller ARGV[3] refreshes its alive key KEYS[2] (TTL ARGV[2] ms) and joins the set of
# holders KEYS[1] (the pop script adds it too; here it is there before the first heartbeat
# announces the worker). Returns {dead letters, holder, ...}: the other holders whose alive
# key (ARGV[1] .. holder) is gone.
_BEAT_LUA = """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[3])
local out = {redis.call('LLEN', KEYS[3])}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= ARGV[3] and redis.call('EXISTS', ARGV[1] .. h) == 0 then out[#out + 1] = h end
end
return out
"""

# Put back every message holder ARGV[1] still holds, in one atomic step, so two live workers
# doing it at once put each message back once. -1 (nothing done) while its alive key KEYS[6]
# exists. A tag counts only while the holder_of hash (KEYS[3]) names this holder: the set
# (KEYS[4]) may keep tags another process acked or restored since. Each message goes back to
# the consuming end of the list it was popped from (it waited longest; kombu's sweep does the
# same, QoS.restore_by_tag) as the very bytes the pop script took (the unacked hash holds
# [message, exchange, routing_key] built around them), its queue's bell rung (ARGV[2]: bell key
# prefix, ARGV[3]: kombu prefix, ARGV[4]: bell TTL), and it counts as a failed delivery
# (KEYS[7]). Values not in the pop script's format (kombu recorded them) are left to the
# visibility timeout. Returns {how many went back, queue, ...} (each queue they went to once).
_RESTORE_HOLDER_LUA = AS_LIST_LUA + """
if redis.call('EXISTS', KEYS[6]) == 1 then return -1 end
local n, plen, queues, seen = 0, #ARGV[3], {}, {}
for _, t in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local h = redis.call('HGET', KEYS[3], t)
  local sp = h and string.find(h, ' ', 1, true)
  if sp and string.sub(h, 1, sp - 1) == ARGV[1] then
    local list = string.sub(h, sp + 1)
    local v = redis.call('HGET', KEYS[1], t)
    local ok, rec = false, nil
    if v then ok, rec = pcall(cjson.decode, v) end
    if ok and type(rec) == 'table' and type(rec[2]) == 'string' and type(rec[3]) == 'string' then
      local tail = ',' .. cjson.encode(rec[2]) .. ',' .. cjson.encode(rec[3]) .. ']'
      if string.sub(v, 1, 1) == '[' and string.sub(v, -#tail) == tail then
        as_list(list)
        redis.call('RPUSH', list, string.sub(v, 2, #v - #tail))
        local q = string.sub(list, plen + 1)
        local s = string.find(q, '\\6\\22', 1, true)
        if s then q = string.sub(q, 1, s - 1) end
        if not seen[q] then
          seen[q] = true
          queues[#queues + 1] = q
        end
        local bell = ARGV[2] .. q
        as_list(bell)
        redis.call('LPUSH', bell, 1)
        redis.call('LTRIM', bell, 0, 0)
        redis.call('PEXPIRE', bell, ARGV[4])
        redis.call('HDEL', KEYS[1], t)
        redis.call('ZREM', KEYS[2], t)
        redis.call('HDEL', KEYS[3], t)
        redis.call('HINCRBY', KEYS[7], t, 1)
        n = n + 1
      end
    elseif not v then
      redis.call('HDEL', KEYS[3], t)
    end
  end
end
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
table.insert(queues, 1, n)
return queues
"""

# Requeue one dead letter (ARGV[1], its exact bytes) of list KEYS[1]: its message ARGV[2] goes
# to list KEYS[2] as a fresh publish would (LPUSH), its bell KEYS[3] rung (TTL ARGV[4]), its
# delivery count (hash KEYS[4], field ARGV[3]) forgotten. 0 when it is no longer there.
_REQUEUE_LUA = AS_LIST_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
as_list(KEYS[2])
redis.call('LPUSH', KEYS[2], ARGV[2])
as_list(KEYS[3])
redis.call('LPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], 0, 0)
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[3])
return 1
"""


class Restored(NamedTuple):
    """What `FailoverStore.restore_holder` put back: how many messages, and to which queues."""

    count: int
    queues: list[str]


class DeadLetter(BaseModel):
    """One entry of the dead-letter list, as `mesh dead-letters list` shows it."""

    list: str  # the Redis list (queue and priority step) it was taken from, without the prefix
    queue: str  # the queue's name as Redis has it (a model id in it is encoded: mesh/protocol/ids.py)
    # the model id of a model queue, decoded (`modèle`, not `mod%C3%A8le`); None for any other
    # queue (a worker's, the control queue) and for a name under the model queues that is no
    # encoding of an id (a producer made it up)
    model: str | None = None
    tag: str  # kombu's delivery tag
    deliveries: int  # deliveries that ended with its holder dead or stalled
    time: float  # when it was dead-lettered
    reason: str
    task: str | None = None  # the Celery task name and id (headers), when it has them
    task_id: str | None = None
    raw: str  # the entry as stored (requeue and purge name it by these bytes)


class FailoverStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._beat = client.register_script(_BEAT_LUA)
        self._restore = client.register_script(_RESTORE_HOLDER_LUA)
        self._requeue = client.register_script(_REQUEUE_LUA)

    # ------------------------------------------------------------------ failover
    def beat(self, holder: str, ttl_s: float) -> tuple[list[str], int]:
        """Keep `holder` (the caller's process) alive for `ttl_s`; returns the holders whose
        process is gone (their alive key expired) and the dead-letter count. One round trip."""
        k = self.keys
        out = self._beat(keys=[k.holders, k.holder_alive(holder), k.dead_letters],
                         args=[k.holder_alive(""), int(ttl_s * 1000), holder])  # fmt: skip
        return [h.decode() for h in out[1:]], int(out[0])

    def restore_holder(self, holder: str) -> Restored:
        """Put back on their queues the messages `holder` still holds (count -1, nothing done,
        while it is alive)."""
        k = self.keys
        out = self._restore(
            keys=[k.unacked, k.unacked_index, k.holder_of, k.held(holder), k.holders, k.holder_alive(holder),
                  k.deliveries],
            args=[holder, k.kombu_prefix + queue_bell(""), k.kombu_prefix, BELL_TTL_MS],
        )  # fmt: skip
        if not isinstance(out, list):
            return Restored(int(out), [])
        return Restored(int(out[0]), [q.decode() for q in out[1:]])

    def held(self, holder: str) -> int:
        """How many unacked messages `holder` holds (its set may also count stale tags)."""
        return int(self.r.scard(self.keys.held(holder)))

    # ------------------------------------------------------------------ dead letters
    def dead_letter_count(self) -> int:
        return int(self.r.llen(self.keys.dead_letters))

    def dead_letters(self, limit: int = 0) -> list[DeadLetter]:
        """The dead letters, newest first (`limit` 0: all)."""
        raw = self.r.lrange(self.keys.dead_letters, 0, limit - 1 if limit > 0 else -1)
        return [entry for r in raw if (entry := self._parse(r, self.keys)) is not None]

    def requeue(self, tags: list[str] | None = None) -> int:
        """Put dead letters (`tags`, None: all) back on the list they came from, with a fresh
        delivery count; returns how many went back."""
        k = self.keys
        n = 0
        for entry in self.dead_letters():
            if tags is not None and entry.tag not in tags:
                continue
            message = json.loads(entry.raw)["message"]
            queue = entry.queue
            n += int(self._requeue(
                keys=[k.dead_letters, k.kombu_prefix + entry.list, k.queue_bell(queue), k.deliveries],
                args=[_bytes(entry.raw), json.dumps(message), entry.tag, BELL_TTL_MS],
            ))  # fmt: skip
        return n

    def purge(self, tags: list[str] | None = None) -> int:
        """Delete dead letters (`tags`, None: all); returns how many went."""
        if tags is None:
            with self.r.pipeline() as p:
                p.llen(self.keys.dead_letters)
                p.delete(self.keys.dead_letters)
                return int(p.execute()[0])
        n = 0
        for entry in self.dead_letters():
            if entry.tag in tags:
                n += int(self.r.lrem(self.keys.dead_letters, 1, _bytes(entry.raw)))
        return n

    @staticmethod
    def _parse(raw: bytes, keys: Keys) -> DeadLetter | None:
        try:
            # a hostile message may hold bytes that are not UTF-8: listed all the same
            d = json.loads(raw.decode("utf-8", "surrogateescape"))
            listkey = str(d["list"])
            message = d.get("message")
            headers = message.get("headers") if isinstance(message, dict) else None
            headers = headers if isinstance(headers, dict) else {}
            task, task_id = headers.get("task"), headers.get("id")
            queue = listkey.split(KOMBU_PRIORITY_SEP, 1)[0]
            return DeadLetter(
                list=listkey, queue=queue, model=keys.model_from_queue(queue), tag=str(d["tag"]),
                deliveries=int(d["deliveries"]), time=float(d["time"]), reason=str(d["reason"]),
                task=task if isinstance(task, str) else None, task_id=task_id if isinstance(task_id, str) else None,
                raw=raw.decode("utf-8", "surrogateescape"),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None  # not written by the pop script: left alone


def _bytes(raw: str) -> bytes:
    """A dead letter's exact bytes again (`DeadLetter.raw` keeps undecodable bytes escaped)."""
    return raw.encode("utf-8", "surrogateescape")
