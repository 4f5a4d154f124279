"""Requests queued for models that are no longer registered ("strays"), in Redis.

A request can reach the queue of a model that is gone after the unregister (or the auto-delete)
has failed what was queued then: kombu's visibility sweep (kombu/transport/redis.py
`QoS.restore_visible`, or mesh/broker/transport.py's restore) puts back the requests a dead
worker held, a producer that saw the model serving a moment earlier enqueues, a restored backup
brings old lists back. Nobody consumes such a queue any more, so its requests would wait for
their `get()` timeout. This store finds them and takes them out for a worker to answer
NOT_FOUND (workers/strays.py); it only reads and writes, the worker decides when.

Which queues are looked at: those of the models unregistered or auto-deleted recently (the
`gone` set, written with the unregister), kept until none of their requests can come back (the
queue is empty and no unacked message names it); and, as a backstop for requests pushed back
at any later time, a slice of a SCAN of the model queues per sweep, resumed where the last one
stopped (a full round takes keyspace / MESH_STRAY_SCAN_KEYS sweeps: the keyspace holds every
result record for `result_expires`, so it is not scanned whole each time).

A queue is taken only once it has been seen holding requests with its model unregistered for
a grace period, measured on Redis's clock: a model registered again meanwhile (a
re-registration, a repository sync, a producer that enqueued just before registering) keeps
its requests. Taking moves the requests to one held list in one atomic step; each is removed
from there only after it is answered, so a sweeper that dies answers nothing twice at most.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import redis

from mesh.protocol.keys import UNDECODABLE, Keys

# KEYS: models hash, draining hash, strays hash, held list, gone set, then the model's queue
# lists. ARGV: model id, grace (s), '1' when no unacked message names the model's queue.
# Returns the number of requests taken; 0 when the queue is empty or the model registered
# (its strays entry then goes; its gone entry too once nothing can come back); -1 while the
# grace runs.
_TAKE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 0
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local depth = 0
for i = 6, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth == 0 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  local since = tonumber(redis.call('ZSCORE', KEYS[5], ARGV[1]))
  if ARGV[3] == '1' and since and since <= now - tonumber(ARGV[2]) then
    redis.call('ZREM', KEYS[5], ARGV[1])
  end
  return 0
end
local first = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if not first then
  redis.call('HSET', KEYS[3], ARGV[1], tostring(now))
  first = now
end
if now - first < tonumber(ARGV[2]) then return -1 end
for i = 6, #KEYS do
  while redis.call('RPOPLPUSH', KEYS[i], KEYS[4]) do end
end
redis.call('HDEL', KEYS[3], ARGV[1])
return depth
"""

# The queues named by kombu's unacked messages (KEYS[1]): the routing key ends each value,
# `[message, exchange, routing_key]`, so only the tail of each is read.
_UNACKED_QUEUES_LUA = """
local seen, out = {}, {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local rk = string.match(string.sub(v, -600), '"([^"]*)"%]$')
  if rk and not seen[rk] then
    seen[rk] = true
    out[#out + 1] = rk
  end
end
return out
"""

# Drop the ARGV[2] oldest held requests (answered), if the sweep still holds the lock
# (KEYS[2] = ARGV[1]), and hold it ARGV[3] ms longer: a sweep whose lock expired mid-way
# leaves them to the next holder (which answers them again: a duplicate, never none).
_DROP_ANSWERED_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

HELD_BATCH = 200


class StrayStore:
    def __init__(self, client: redis.Redis, keys: Keys, priority_steps: list[int]) -> None:
        self.r = client
        self.keys = keys
        self.priority_steps = priority_steps
        self._take = client.register_script(_TAKE_LUA)
        self._unacked_queues = client.register_script(_UNACKED_QUEUES_LUA)
        self._drop = client.register_script(_DROP_ANSWERED_LUA)

    def acquire(self, token: str, interval_s: float) -> bool:
        """The right to sweep for `interval_s`; never released, so it also spaces the sweeps
        of the whole pool."""
        return bool(self.r.set(self.keys.strays_lock, token, nx=True, px=max(1, int(interval_s * 1000))))

    def candidates(self, scan_keys: int) -> dict[str, list[str]]:
        """model id -> queue lists, for the models to look at: gone ones, ones already seen
        stray, and those whose queue lists the next `scan_keys` keys of the SCAN hold (an
        empty list does not exist in Redis)."""
        # Queue names are ASCII when Mesh made them (ids are encoded), but a producer may push
        # to any name: latin-1 maps its bytes to str one to one. Members of `gone` and
        # `strays` are ids (UTF-8), or UNDECODABLE + such a name's latin-1 tail.
        k = self.keys
        found: dict[str, set[str]] = defaultdict(set)
        cursor = int(self.r.get(k.strays_cursor) or 0)
        scanned = 0
        while scanned < scan_keys:
            cursor, batch = self.r.scan(cursor, match=k.model_queue_lists_pattern(), count=1000, _type="list")
            scanned += 1000
            for raw in batch:
                key = raw.decode("latin-1")
                parsed = k.model_of_queue_list(key)
                if parsed is not None:
                    found[parsed[0]].add(key)
            if cursor == 0:
                break
        if cursor:
            self.r.set(k.strays_cursor, cursor)
        else:  # a round done: nothing to keep (and no key left behind in a small keyspace)
            self.r.delete(k.strays_cursor)
        with self.r.pipeline(transaction=False) as p:
            p.zrange(k.gone, 0, -1)
            p.hkeys(k.strays)
            gone, seen = p.execute()
        for raw in (*gone, *seen):
            model_id = _from_member(raw)
            if model_id is not None:
                found[model_id]
        return {m: sorted(keys | set(self.queue_lists(m))) for m, keys in found.items()}

    def queue_lists(self, model_id: str) -> list[str]:
        """The Redis lists of a model's queue, for any id as found (`Keys.model_of_queue_list`)."""
        return self.keys.queue_list_keys(self.keys.queue_of_found(model_id), self.priority_steps)

    def watching_gone(self) -> bool:
        return bool(self.r.zcard(self.keys.gone))

    def unacked_queues(self) -> set[str]:
        """The queues that kombu's unacked messages go back to when restored."""
        return {q.decode("latin-1") for q in self._unacked_queues(keys=[self.keys.unacked])}

    def take_if_stray(self, model_id: str, lists: list[str], grace_s: float, unacked: bool = False) -> int:
        """Move the model's queued requests to the held list if it has been unregistered (and
        not draining) with requests queued for `grace_s`; see _TAKE_LUA. `unacked`: whether an
        unacked message names its queue (then its gone entry stays: it may come back)."""
        k = self.keys
        return int(self._take(
            keys=[k.models, k.draining, k.strays, k.strays_held, k.gone, *(key.encode("latin-1") for key in lists)],
            args=[_member(model_id), grace_s, "0" if unacked else "1"],
        ))  # fmt: skip

    def answer_held(self, token: str, answer: Callable[[bytes], None], interval_s: float = 5.0) -> int:
        """Call `answer` on each held request, oldest first, and drop the answered ones;
        returns how many. Each batch answered holds the lock `interval_s` longer; stops when
        the lock is no longer ours."""
        k = self.keys
        done = 0
        while True:
            batch = self.r.lrange(k.strays_held, -HELD_BATCH, -1)
            if not batch:
                return done
            for raw in reversed(batch):  # RPOPLPUSH put the oldest at the right end
                answer(raw)
            lease_ms = max(1, int(interval_s * 1000))
            if not self._drop(keys=[k.strays_held, k.strays_lock], args=[token, len(batch), lease_ms]):
                return done
            done += len(batch)


def _member(model_id: str) -> bytes:
    """An id as found, as a member of `gone` / `strays` (and the models hash's field)."""
    if model_id.startswith(UNDECODABLE):
        return model_id.encode("latin-1")
    return model_id.encode("utf-8")


def _from_member(raw: bytes) -> str | None:
    """`_member`'s inverse; None for a member neither wrote."""
    if raw.startswith(UNDECODABLE.encode()):
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
