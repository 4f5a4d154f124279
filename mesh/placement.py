"""Placement policy for the cold path: which worker loads a model that has no copy.

Pure functions over plain data. The beat scheduler's planner (mesh/planner.py) makes the
cluster-wide decisions; this is the immediate choice a producer or a worker makes when a
request finds no copy, so the first request never waits for a scheduler tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .models import FailedCopy, WorkerState


def fresh_failures(failures: Iterable[FailedCopy], now: float, expiry_s: float) -> list[FailedCopy]:
    """Failure records younger than `expiry_s`, newest first."""
    return sorted((f for f in failures if now - f.time < expiry_s), key=lambda f: -f.time)


def choose_worker(
    workers: Iterable[WorkerState],
    *,
    failed_on: Iterable[str] = (),
    exclude: Iterable[str] = (),
    size_hint: int = 0,
) -> str | None:
    """The worker to load a new copy on, or None when no live worker may take it.

    Rule (ModelMesh §3.4, simplified for the cold path): skip workers that are shutting down,
    already failed this model recently, or are excluded (they already hold a copy); prefer
    workers where the model fits without evicting anything, then the most free capacity,
    then the fewest loaded models, then the name (deterministic).
    """
    blocked = set(failed_on) | set(exclude)
    candidates = [w for w in workers if not w.shutting_down and w.name not in blocked]
    if not candidates:
        return None

    def rank(w: WorkerState) -> tuple:
        fits = w.free_bytes >= size_hint
        return (not fits, -w.free_bytes, len(w.models) + len(w.loading), w.name)

    return min(candidates, key=rank).name


def workers_by_name(workers: Iterable[WorkerState]) -> Mapping[str, WorkerState]:
    return {w.name: w for w in workers}
