"""Requests queued for models that are no longer registered ("strays"), in Redis.

A request can reach the queue of a model that is gone after the unregister (or the auto-delete)
has failed what was queued then: kombu's visibility sweep (kombu/transport/redis.py
`QoS.restore_visible`, or mesh/broker/transport.py's restore) puts back the requests a dead
worker held, a producer that saw the model serving a moment earlier enqueues, a restored backup
brings old lists back. Nobody consumes such a queue any more, so its requests would wait for
their `get()` timeout. This store finds them and takes them out for a worker to answer
NOT_FOUND (workers/strays.py); it only reads and writes, the worker decides when.

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

from mesh.protocol.keys import Keys

# KEYS: models hash, draining hash, strays hash, held list, then the model's queue lists.
# ARGV: model id, grace (s). Returns the number of requests taken, 0 when the queue is empty
# or the model registered (its strays entry then goes), -1 while the grace runs.
_TAKE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 0
end
local depth = 0
for i = 5, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
if depth == 0 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local first = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if not first then
  redis.call('HSET', KEYS[3], ARGV[1], tostring(now))
  first = now
end
if now - first < tonumber(ARGV[2]) then return -1 end
for i = 5, #KEYS do
  while redis.call('RPOPLPUSH', KEYS[i], KEYS[4]) do end
end
redis.call('HDEL', KEYS[3], ARGV[1])
return depth
"""

# Drop the ARGV[2] oldest held requests (answered), if the sweep still holds the lock
# (KEYS[2] = ARGV[1]): one whose lock expired mid-sweep leaves them to the next holder.
_DROP_ANSWERED_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
return 1
"""

HELD_BATCH = 200


class StrayStore:
    def __init__(self, client: redis.Redis, keys: Keys, priority_steps: list[int]) -> None:
        self.r = client
        self.keys = keys
        self.priority_steps = priority_steps
        self._take = client.register_script(_TAKE_LUA)
        self._drop = client.register_script(_DROP_ANSWERED_LUA)

    def acquire(self, token: str, interval_s: float) -> bool:
        """The right to sweep for `interval_s`; never released, so it also spaces the sweeps
        of the whole pool."""
        return bool(self.r.set(self.keys.strays_lock, token, nx=True, px=max(1, int(interval_s * 1000))))

    def queued_models(self) -> dict[str, list[str]]:
        """model id -> queue lists, for every model queue holding requests (SCAN: an empty
        list does not exist in Redis) and every model already seen stray."""
        # Names as Redis holds them: latin-1 maps bytes to str one to one, and a producer may
        # push to a name that is not UTF-8.
        k = self.keys
        found: dict[str, set[str]] = defaultdict(set)
        for raw in self.r.scan_iter(match=k.model_queue_lists_pattern(), count=1000, _type="list"):
            key = raw.decode("latin-1")
            parsed = k.model_of_queue_list(key)
            if parsed is not None:
                found[parsed[0]].add(key)
                found[parsed[0]].update(k.queue_list_keys(parsed[1], self.priority_steps))
        for raw in self.r.hkeys(k.strays):
            model_id = raw.decode("latin-1")
            if model_id not in found:
                queue = f"{k.prefix}.model.{model_id}"
                found[model_id].update(k.queue_list_keys(queue, self.priority_steps))
        return {m: sorted(keys) for m, keys in found.items()}

    def take_if_stray(self, model_id: str, lists: list[str], grace_s: float) -> int:
        """Move the model's queued requests to the held list if it has been unregistered (and
        not draining) with requests queued for `grace_s`; see _TAKE_LUA."""
        k = self.keys
        return int(self._take(
            keys=[k.models, k.draining, k.strays, k.strays_held, *(key.encode("latin-1") for key in lists)],
            args=[model_id.encode("latin-1"), grace_s],
        ))  # fmt: skip

    def answer_held(self, token: str, answer: Callable[[bytes], None]) -> int:
        """Call `answer` on each held request, oldest first, and drop the answered ones;
        returns how many. Stops when the lock is no longer ours."""
        k = self.keys
        done = 0
        while True:
            batch = self.r.lrange(k.strays_held, -HELD_BATCH, -1)
            if not batch:
                return done
            for raw in reversed(batch):  # RPOPLPUSH put the oldest at the right end
                answer(raw)
            if not self._drop(keys=[k.strays_held, k.strays_lock], args=[token, len(batch)]):
                return done
            done += len(batch)
