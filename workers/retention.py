"""Which loaded model a full worker gives up first: the retention policy (pure, no I/O).

Two policies (MESH_EVICTION_POLICY):

- ``lru``: the least recently used model goes first (ModelMesh's weighted LRU: kserve/modelmesh
  src/main/java/com/ibm/watson/modelmesh/clhm/ConcurrentLinkedHashMap.java).
- ``usage`` (default): the model with the lowest decayed request count goes first, the least
  recently used among equals: the order the planner uses for its victims (mesh/policy/planner.py),
  applied by the worker on every cold load.

Why ``usage`` is the default: under skewed traffic a cache of N models answers most requests
from its N most requested models, but LRU cannot tell a popular model from a one-off: each
request for a rarely used model pushes out whatever was used least recently, often a popular
one, which then has to be loaded again. Counting requests (with history that survives the
model's eviction, decayed so the cache follows shifting traffic) keeps the popular models and
lets the rare ones take turns in the remaining room. On the multimodel benchmark's Zipf stream
(200 models, s = 1.0, 2 x 20 slots) the same caches make ~27 % fewer loads than LRU
(scripts/bench multimodel; docs/benchmarks.md).

The decay (MESH_EVICTION_DECAY_S, time constant, default 120 s) bounds how long a model that
was popular and is no longer keeps its place: its count falls by e every time constant.

Under both policies a copy that has not answered anything since its load is evicted last (for
FRESH_S at most): loads queue one after another, and without this the next load would evict a
rarely used model the moment it arrived, before the requests that asked for it were answered;
they would go back to its queue and load it again (a ping-pong the multimodel bench showed).
Requests waiting for a copy on this worker (buffered, or in a running batch) add to its count:
evicting it would send them back to be loaded again.

That protection must not cost a popular model its place, though. Under churn a worker holds
several fresh copies at once (five to nine at the peaks of the multimodel bench: in a burst of
reloads one lands every 10-15 ms, and a copy answers its first batch ~30 ms after its load, p90
80 ms). When the copies the policy would give up first were all fresh, the victim used to be
the next in line, often a model ranked 15-40 with a high count, loaded again within a second.
Now `make_room` holds such fresh copies above capacity instead (`deferrable`), by up to
MESH_FRESH_OVERCOMMIT_FRACTION of it, and the worker evicts by the policy again once they have
answered (workers/manager.py, `trim`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cachetools import LRUCache

Policy = Literal["usage", "lru"]
POLICIES: tuple[Policy, ...] = ("usage", "lru")

# A copy that has answered nothing since its load is kept at least this long (see above); a
# proactive load nobody asks for loses the protection then.
FRESH_S = 10.0

# Models whose usage is remembered after they leave (the oldest-used are forgotten first): far
# more than any worker holds, a few hundred kilobytes at most.
HISTORY_MODELS = 10_000


@dataclass(frozen=True)
class Candidate:
    """A loaded model that may be evicted: its decayed request count plus the requests waiting
    for it here, its last use (any monotonic order: a sequence number or a timestamp), and
    whether it is fresh (loaded, nothing answered yet, younger than FRESH_S)."""

    model_id: str
    score: float
    last_used: float
    fresh: bool = False
    size: int = 1  # bytes


def eviction_key(c: Candidate, policy: Policy) -> tuple[float, ...]:
    """Sort key: the lowest key is evicted first."""
    if policy == "lru":
        return (c.fresh, c.last_used)
    return (c.fresh, c.score, c.last_used)


def first_victim(candidates: Iterable[Candidate], policy: Policy) -> str | None:
    """The model to evict first, or None when there is none."""
    best = min(candidates, key=lambda c: eviction_key(c, policy), default=None)
    return None if best is None else best.model_id


def deferrable(candidates: Iterable[Candidate], policy: Policy) -> str | None:
    """The fresh copy the policy would evict first if freshness did not protect it, or None.

    Evicting the policy's victim instead would give up a model that ranks above this copy;
    the worker holds the copy beyond capacity until it has answered, then evicts again."""
    best = min(candidates, key=lambda c: eviction_key(c, policy)[1:], default=None)
    return best.model_id if best is not None and best.fresh else None


def make_room(
    candidates: Iterable[Candidate], policy: Policy, *, used: int, needed: int, capacity: int,
    overcommit: int = 0,
) -> list[str]:  # fmt: skip
    """The models to evict, in order, so that `needed` more bytes fit beside `used` in
    `capacity`; a fresh copy the policy would evict first but for its freshness (`deferrable`)
    is held instead, above capacity by at most `overcommit` bytes for all such copies."""
    left = {c.model_id: c for c in candidates}
    limit, victims, held = capacity, [], []
    while left and used + needed > limit:
        fresh = deferrable(left.values(), policy)
        if fresh is not None and limit + left[fresh].size <= capacity + overcommit:
            held.append(left.pop(fresh))
            limit += held[-1].size
            continue
        victim = left.pop(first_victim(left.values(), policy))  # type: ignore[arg-type]
        victims.append(victim.model_id)
        used -= victim.size
    if used + needed > limit:
        # nothing else left to evict and still too full (loads in progress reserve the rest):
        # the held copies go too, as they would without the allowance
        for copy in held:
            if used + needed <= capacity:
                break
            victims.append(copy.model_id)
            used -= copy.size
    return victims


class UsageMeter:
    """Exponentially decayed request counts per model, kept after a model is evicted so a
    popular model comes back with its standing (bounded: HISTORY_MODELS, least recently
    counted forgotten first). Not thread-safe: the manager calls it under its lock."""

    def __init__(self, decay_s: float, max_models: int = HISTORY_MODELS) -> None:
        if decay_s <= 0:
            raise ValueError("decay_s must be > 0")
        self.decay_s = decay_s
        self._counts: LRUCache = LRUCache(maxsize=max_models)  # model id -> (count, at)

    def record(self, model_id: str, requests: int, now: float) -> None:
        self._counts[model_id] = (self.score(model_id, now) + requests, now)

    def score(self, model_id: str, now: float) -> float:
        count, at = self._counts.get(model_id, (0.0, now))
        return count * math.exp(-max(0.0, now - at) / self.decay_s)

    def forget(self, model_id: str) -> None:
        """An unregistered model's history goes with it (a re-registered model starts at 0)."""
        self._counts.pop(model_id, None)

    def __len__(self) -> int:
        return len(self._counts)
