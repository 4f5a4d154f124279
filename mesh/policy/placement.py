"""Placement policy for the cold path: which worker loads a model that has no copy.

Pure functions over plain data. The beat scheduler's planner (mesh/policy/planner.py) makes the
cluster-wide decisions; this is the immediate choice a producer or a worker makes when a
request finds no copy, so the first request never waits for a scheduler tick.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from mesh.models import FailedCopy, WorkerState
from mesh.policy.labels import matches

# Loads a home worker may have waiting beyond the least busy one's before a cold load skips it.
SPILL_BACKLOG = 2


def fresh_failures(failures: Iterable[FailedCopy], now: float, expiry_s: float) -> list[FailedCopy]:
    """Failure records younger than `expiry_s`, newest first."""
    return sorted((f for f in failures if now - f.time < expiry_s), key=lambda f: -f.time)


def affinity(model_id: str, worker: str) -> int:
    """Rendezvous (highest-random-weight) score of a model on a worker: stable, and spread
    evenly over workers whatever their names."""
    digest = hashlib.blake2b(f"{model_id}\x00{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose_worker(
    workers: Iterable[WorkerState],
    *,
    model_id: str = "",
    failed_on: Iterable[str] = (),
    exclude: Iterable[str] = (),
    size_hint: int = 0,
    backlog: Mapping[str, int] | None = None,
    required_labels: Mapping[str, str] | None = None,
) -> str | None:
    """The worker to load a new copy on, or None when no live worker may take it.

    Rule (ModelMesh's `PLACEMENT_ORDER`, kserve/modelmesh
    src/main/java/com/ibm/watson/modelmesh/ModelMesh.java, simplified for the cold path): skip
    workers that are shutting down, already failed this model recently, or are excluded (they already hold a copy). Where the
    model fits without evicting anything: the most free capacity, then the fewest loaded
    models, then the name. Where it fits nowhere: the worker with the model's highest
    rendezvous score. Full workers all look alike (no free bytes), so any fixed order would
    send every eviction to one of them; the score gives each model a stable home instead, so
    the workers' caches partition the models like one pooled cache. Unless that home has
    SPILL_BACKLOG more loads waiting than the least busy worker: then that one.

    `backlog`: loads each worker has been sent and not finished, read live (Keys.load_line);
    without it, the heartbeat's list of loads in progress (up to an interval old).
    `required_labels`: only workers carrying them are candidates (mesh/policy/labels.py); the
    rendezvous home is then the home within that pool.
    """
    blocked = set(failed_on) | set(exclude)
    candidates = [
        w for w in workers
        if not w.shutting_down and w.name not in blocked and matches(required_labels, w.labels)
    ]  # fmt: skip
    if not candidates:
        return None
    line = {w.name: len(w.loading) if backlog is None else backlog.get(w.name, 0) for w in candidates}
    fitting = [w for w in candidates if w.free_bytes >= size_hint]
    if fitting:
        return min(fitting, key=lambda w: (-w.free_bytes, len(w.models) + line[w.name], w.name)).name
    home = max(candidates, key=lambda w: (affinity(model_id, w.name), w.name))
    # A worker loads one model after another: behind a long line of loads the request would
    # wait for all of them. The home worker of the most requested models also loads the most
    # (multimodel bench: ~1 s in its line while the other's was empty), so a load goes past it
    # when its line is SPILL_BACKLOG longer than the shortest. Read live (see `backlog`), the
    # lines are exact to a round trip; the margin keeps a model at home while lines are short
    # (multimodel bench, margins 1, 2 and 4: 2 had the best throughput and p99).
    shortest = min(candidates, key=lambda w: (line[w.name], -affinity(model_id, w.name), w.name))
    if line[home.name] - line[shortest.name] >= SPILL_BACKLOG:
        return shortest.name
    return home.name
