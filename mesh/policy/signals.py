"""Autoscaling signals of one mesh, from plain data: what is pending per model, for how long,
how many copies serve it, and the bytes of models wanted against the workers' capacity.

Pure: mesh/store/signals.py reads the inputs (queue lengths and oldest send times from Redis,
the workers' heartbeats, model sizes), mesh/tools/exporter.py renders the result. Cardinality is
bounded whatever the number of models: per-model figures only for the `top_n` models with the
most pending requests, everything else in cluster-wide aggregates (docs/operations.md,
"Autoscaling signals").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from mesh.models import WorkerState


class ModelSignal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    pending: int  # queued + buffered + inflight
    queued: int  # waiting in its Redis queue
    buffered: int  # held by workers: buffered or in a running batch
    oldest_pending_age_s: float  # 0 when nothing is pending
    copies: int  # loaded copies on live workers


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


def summarize(
    *,
    queued: Mapping[str, int],
    oldest_sent: Mapping[str, float],
    workers: Iterable[WorkerState],
    sizes: Mapping[str, int],
    registered: int,
    now: float,
    top_n: int,
) -> Signals:
    """The signals from: requests waiting per model in Redis (`queued`), the send time (epoch
    seconds) of the oldest one per model (`oldest_sent`, where known), the live workers'
    heartbeats, model sizes in bytes (`sizes`, of the wanted models that have one), the number
    of registered models, the time now (epoch seconds) and how many models to detail."""
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
    )


__all__ = ["ModelSignal", "Signals", "summarize"]
