"""Autoscaling signals of one mesh, from plain data: what is pending per model, for how long,
how many copies serve it, and the bytes of models wanted against the workers' capacity, for
the whole mesh and per worker pool.

Pure: mesh/store/signals.py reads the inputs (queue lengths and oldest send times from Redis,
the workers' heartbeats, model sizes), mesh/tools/exporter.py renders the result. Cardinality is
bounded whatever the number of models: per-model figures only for the `top_n` models with the
most pending requests, everything else in cluster-wide aggregates (docs/operations.md,
"Autoscaling signals").

A pool (mesh/policy/labels.py) is the set of labels the models in it require: the models
that require none are the `default` pool, which any worker serves. A pool's workers are the
live ones carrying its labels, so a worker may count in several pools (every worker counts in
`default`): a pool's capacity is what its models may use, not a share of the mesh's. Only the
pools of wanted models are known (read from their records), plus `default`; the `top_pools`
with the most demand get their own row, the rest one `other` row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from mesh.models import WorkerState
from mesh.policy.labels import matches
from mesh.protocol.labels import format_labels
from mesh.settings import MeshSettings

DEFAULT_POOL = "default"  # models that require no label (a pool's name always holds a '=')
OTHER_POOLS = "other"  # the pools past the top ones, summed


class ModelSignal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    pending: int  # queued + buffered + inflight
    queued: int  # waiting in its Redis queue
    buffered: int  # held by workers: buffered or in a running batch
    oldest_pending_age_s: float  # 0 when nothing is pending
    copies: int  # loaded copies on live workers


class PoolSignal(BaseModel):
    """Demand against capacity in one worker pool (or the pools past the top ones, `other`)."""

    model_config = ConfigDict(extra="forbid")

    pool: str  # its required labels as `env=a,zone=b`; `default`; `other`
    required_labels: dict[str, str] | None  # None for `other`
    workers: int  # live workers carrying the labels, not shutting down
    capacity_bytes: int  # theirs
    used_bytes: int  # bytes loaded or loading on the live workers carrying the labels
    demand_bytes: int  # bytes of the pool's models wanted in memory: loaded or pending
    demand_unknown_models: int  # wanted models of the pool whose size is not known yet
    pending: int  # requests of the pool's models: queued + buffered + inflight
    models_pending: int
    models_pending_without_copy: int  # pending, no live worker holds a copy: cold loads
    models_loaded: int


class Signals(BaseModel):
    """One reading of the mesh's signals (`mesh status --json`, the exporter's /metrics)."""

    model_config = ConfigDict(extra="forbid")

    generated_at: float
    top_n: int
    models: list[ModelSignal]  # the top_n models by pending, most pending first
    pending: int  # every model's, top or not
    queued: int
    buffered: int
    oldest_pending_age_s: float  # of any model
    models_registered: int
    models_pending: int  # models with at least one pending request
    models_pending_without_copy: int  # pending, and no live worker holds a copy: cold loads
    models_loaded: int  # distinct models with a loaded copy
    copies_loaded: int
    workers: int  # live (heartbeat present), shutting down included
    workers_shutting_down: int
    capacity_bytes: int  # sum over live workers not shutting down
    used_bytes: int
    demand_bytes: int  # bytes of the models wanted in memory: loaded or pending
    demand_unknown_models: int  # wanted models whose size is not known yet (not counted above)
    top_pools: int
    # per pool: the `top_pools` with the most demand, then `other` (the rest summed) if any
    pools: list[PoolSignal]


def summarize(
    *,
    queued: Mapping[str, int],
    oldest_sent: Mapping[str, float],
    workers: Iterable[WorkerState],
    sizes: Mapping[str, int],
    registered: int,
    now: float,
    top_n: int,
    required: Mapping[str, Mapping[str, str]] | None = None,
    top_pools: int = MeshSettings.model_fields["signals_top_pools"].default,
) -> Signals:
    """The signals from: requests waiting per model in Redis (`queued`), the send time (epoch
    seconds) of the oldest one per model (`oldest_sent`, where known), the live workers'
    heartbeats, model sizes in bytes (`sizes`, of the wanted models that have one), the number
    of registered models, the time now (epoch seconds) and how many models to detail; and for
    the pools, the labels each wanted model requires (`required`: those that require some)
    and how many pools to detail."""
    workers = list(workers)
    held: dict[str, int] = {}
    waited: dict[str, float] = {}
    copies: dict[str, int] = {}
    capacity = used = shutting = n_workers = 0
    for w in workers:
        n_workers += 1
        if w.shutting_down:
            shutting += 1
        else:
            capacity += w.capacity_bytes
        used += w.used_bytes
        for m in w.models:
            copies[m.model_id] = copies.get(m.model_id, 0) + 1
            if m.buffered or m.inflight:
                held[m.model_id] = held.get(m.model_id, 0) + m.buffered + m.inflight
            if m.oldest_buffered_s > waited.get(m.model_id, 0.0):
                waited[m.model_id] = m.oldest_buffered_s
    pending_ids = {m for m, n in queued.items() if n > 0} | set(held)

    def age(model_id: str) -> float:
        sent = oldest_sent.get(model_id)
        in_queue = max(0.0, now - sent) if sent is not None and queued.get(model_id, 0) > 0 else 0.0
        return round(max(in_queue, waited.get(model_id, 0.0)), 3)

    rows = [
        ModelSignal(
            model_id=m, pending=queued.get(m, 0) + held.get(m, 0), queued=queued.get(m, 0),
            buffered=held.get(m, 0), oldest_pending_age_s=age(m), copies=copies.get(m, 0),
        )  # fmt: skip
        for m in pending_ids
    ]
    rows.sort(key=lambda r: (-r.pending, -r.oldest_pending_age_s, r.model_id))
    wanted = pending_ids | set(copies)
    pools = _pools(wanted, {r.model_id: r for r in rows}, copies, sizes, required or {}, workers, top_pools)
    return Signals(
        generated_at=now,
        top_n=top_n,
        models=rows[: max(0, top_n)],
        pending=sum(r.pending for r in rows),
        queued=sum(r.queued for r in rows),
        buffered=sum(r.buffered for r in rows),
        oldest_pending_age_s=max((r.oldest_pending_age_s for r in rows), default=0.0),
        models_registered=registered,
        models_pending=len(rows),
        models_pending_without_copy=sum(1 for r in rows if r.copies == 0),
        models_loaded=len(copies),
        copies_loaded=sum(copies.values()),
        workers=n_workers,
        workers_shutting_down=shutting,
        capacity_bytes=capacity,
        used_bytes=used,
        demand_bytes=sum(sizes[m] for m in wanted if m in sizes),
        demand_unknown_models=sum(1 for m in wanted if m not in sizes),
        top_pools=top_pools,
        pools=pools,
    )


def _pools(
    wanted: set[str],
    pending: Mapping[str, ModelSignal],
    copies: Mapping[str, int],
    sizes: Mapping[str, int],
    required: Mapping[str, Mapping[str, str]],
    workers: list[WorkerState],
    top: int,
) -> list[PoolSignal]:
    """The pools of the wanted models (and `default`), the `top` by demand and `other`."""
    needs: dict[str, dict[str, str]] = {DEFAULT_POOL: {}}  # pool -> its required labels
    # per pool: demand bytes, unknown sizes, pending, models pending, of those without copy, loaded
    figures: dict[str, list[int]] = {DEFAULT_POOL: [0] * 6}
    for m in wanted:
        labels = required.get(m)
        name = format_labels(labels) if labels else DEFAULT_POOL
        f = figures.get(name)
        if f is None:
            f = figures[name] = [0] * 6
            needs[name] = dict(labels or {})
        if m in sizes:
            f[0] += sizes[m]
        else:
            f[1] += 1
        row = pending.get(m)
        if row is not None:
            f[2] += row.pending
            f[3] += 1
            if row.copies == 0:
                f[4] += 1
        if m in copies:
            f[5] += 1
    order = sorted(figures, key=lambda p: (-figures[p][0], -figures[p][2], p))
    shown, rest = order[: max(0, top)], order[max(0, top) :]
    # the workers by their label sets (a few, whatever the number of workers): which pools each serves
    by_labels: dict[tuple[tuple[str, str], ...], list[WorkerState]] = {}
    for w in workers:
        by_labels.setdefault(tuple(sorted(w.labels.items())), []).append(w)

    def pool(name: str, labels: dict[str, str] | None, members: list[str]) -> PoolSignal:
        serving = [ws for key, ws in by_labels.items() if any(matches(needs[p], dict(key)) for p in members)]
        live = [w for ws in serving for w in ws]
        sums = [sum(figures[p][i] for p in members) for i in range(6)]
        return PoolSignal(
            pool=name, required_labels=labels,
            workers=sum(1 for w in live if not w.shutting_down),
            capacity_bytes=sum(w.capacity_bytes for w in live if not w.shutting_down),
            used_bytes=sum(w.used_bytes for w in live),
            demand_bytes=sums[0], demand_unknown_models=sums[1], pending=sums[2], models_pending=sums[3],
            models_pending_without_copy=sums[4], models_loaded=sums[5],
        )  # fmt: skip

    out = [pool(p, needs[p], [p]) for p in shown]
    if rest:
        out.append(pool(OTHER_POOLS, None, rest))
    return out


__all__ = ["DEFAULT_POOL", "OTHER_POOLS", "ModelSignal", "PoolSignal", "Signals", "summarize"]
