"""Vmodel cutover policy: when a transition may switch, how many target copies to load, when
it is blocked by a failed load, and when an auto-deleted model's copies may be unloaded.

Pure functions over plain data, no I/O: mesh/control/vmodels.py reads Redis, asks these, and acts.

The rule (the promise of ModelMesh's kserve/modelmesh docs/vmodels.md, "scaled out to the
same degree as the existing active model", which ModelMesh's own code does not keep: it switches as soon
as ONE copy of the target is loaded): requests keep going to the active model until the
target is LOADED on as many copies as the active has, unless `force`, and at once when the
active has no copy at all. One refinement: a switch also waits while a copy of the active is
still loading, because the requests waiting for that load are in the active's queue and only
that copy can answer them (an auto-deleted active would otherwise fail them).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from mesh.models import CopyState, ModelState, ModelStatus


@dataclass(frozen=True)
class ModelView:
    """What the cutover needs to know about one concrete model (live copies only)."""

    registered: bool = True
    loaded: frozenset[str] = frozenset()  # live workers with a LOADED copy
    loading: frozenset[str] = frozenset()  # live workers with a LOADING copy
    load_claimed: bool = False  # a load is being placed and no copy is recorded yet
    failed_on: frozenset[str] = frozenset()  # workers with a fresh (unexpired) failure record

    @property
    def holders(self) -> frozenset[str]:
        return self.loaded | self.loading

    @property
    def has_copy(self) -> bool:
        """A copy exists or is on its way: requests sent to the model will be answered."""
        return bool(self.holders) or self.load_claimed

    @property
    def loads_in_flight(self) -> int:
        return len(self.loading) + (1 if self.load_claimed and not self.holders else 0)

    @classmethod
    def from_status(cls, status: ModelStatus) -> ModelView:
        """From StateStore.model_status (which already dropped dead workers and expired failures)."""
        if status.state is ModelState.NOT_FOUND:
            return cls(registered=False)
        loaded = frozenset(c.worker for c in status.copies if c.state is CopyState.LOADED)
        loading = frozenset(c.worker for c in status.copies if c.state is CopyState.LOADING)
        return cls(
            registered=True,
            loaded=loaded,
            loading=loading - loaded,
            load_claimed=status.state is ModelState.LOADING and not status.copies,
            failed_on=frozenset(f.worker for f in status.failed_copies),
        )


class Action(str, Enum):
    SWITCH = "switch"  # make the target active now
    LOAD = "load"  # place `copies` more copies of the target
    BLOCKED = "blocked"  # the target failed to load: mark the transition failed
    WAIT = "wait"  # loads are in flight, or nowhere to load: look again later


@dataclass(frozen=True)
class Decision:
    action: Action
    copies: int = 0  # for LOAD: how many target copies to place now
    clear_failed: bool = False  # the target is being (re)loaded: the transition is no longer blocked
    reason: str = ""


def copies_needed(active: ModelView, workers: int) -> int:
    """Target copies that must be LOADED before the switch: as many as the active has LOADED
    (at least one when it has any copy), capped by the workers that could hold one; 0 when the
    active has no copy at all (nothing serves it, so nothing to protect)."""
    if not active.has_copy:
        return 0
    return max(1, min(len(active.loaded), workers))


def may_switch_now(
    active: ModelView, target: ModelView, workers: Collection[str], force: bool
) -> bool:
    """The immediate switch of `set_vmodel` (ModelMesh: force, or the active has no copy, or
    one copy and the target LOADED; here: the same parity rule as the transition driver)."""
    return force or decide(active=active, target=target, workers=workers).action is Action.SWITCH


def decide(
    *,
    active: ModelView,
    target: ModelView,
    workers: Collection[str],
    max_load_attempts: int = 3,
    failed_flag: bool = False,
) -> Decision:
    """One step of a pending transition.

    `workers` are the live workers that may hold a copy (not shutting down); `failed_flag` is
    the vmodel's `target_load_failed`. The target is blocked (TRANSITION_FAILED) when it still
    lacks copies, nothing of it is loading, and every worker that could take it failed it
    recently (or it failed `max_load_attempts` times): it is retried once those failure records
    expire, which is when `workers` minus `failed_on` is no longer empty.
    """
    if not target.registered:
        return Decision(Action.WAIT, reason="target model is not registered")
    need = copies_needed(active, len(workers))
    if need == 0:
        return Decision(Action.SWITCH, reason="the active model has no copy")
    if len(target.loaded) >= need:
        if active.loading or (active.load_claimed and not active.holders):
            return Decision(
                Action.WAIT, clear_failed=failed_flag, reason="a copy of the active model is still loading"
            )
        return Decision(Action.SWITCH, reason=f"target loaded on {len(target.loaded)}/{need} copies")
    in_flight = target.loads_in_flight
    missing = need - len(target.loaded) - in_flight
    exhausted = len(target.failed_on) >= max_load_attempts
    placeable = set() if exhausted else set(workers) - target.holders - target.failed_on
    if missing > 0 and placeable:
        return Decision(
            Action.LOAD,
            copies=min(missing, len(placeable)),
            clear_failed=failed_flag,
            reason=f"target loaded on {len(target.loaded)}/{need} copies, {in_flight} loading",
        )
    if in_flight:
        return Decision(Action.WAIT, clear_failed=failed_flag, reason=f"{in_flight} target load(s) in flight")
    if target.failed_on:
        if failed_flag:
            return Decision(Action.WAIT, reason="blocked by a failed load until its failure records expire")
        return Decision(Action.BLOCKED, reason=f"target failed to load on {sorted(target.failed_on)}")
    return Decision(Action.WAIT, reason="no worker can take a copy of the target")


def copies_after_set(previous_active_copies: int, load_now: bool, workers: int) -> int:
    """Copies to ensure of the vmodel's model after a `set_vmodel` that left no transition
    pending: the previous active's scale (ModelMesh loads only one: its "TODO include count"),
    else one if `load_now`, else none."""
    n = previous_active_copies if previous_active_copies > 0 else (1 if load_now else 0)
    return min(n, max(workers, 1)) if n else 0


# ---------------------------------------------------------------------- draining


class DrainAction(str, Enum):
    UNLOAD = "unload"  # unload the copies now (requests still queued get NOT_FOUND)
    MARK_DRAINED = "mark_drained"  # the queue is empty: remember when it was first seen so
    RESET = "reset"  # the queue filled again
    WAIT = "wait"


@dataclass(frozen=True)
class HolderReport:
    """A worker holding a copy of a draining model, from its latest heartbeat."""

    updated_at: float  # when the heartbeat was written (wall clock)
    pending: int  # requests of the model buffered or in a batch on that worker


def drain_decision(
    *,
    since: float,
    drained_at: float | None,
    now: float,
    queue_depth: int,
    holders: Mapping[str, HolderReport | None],
    grace_s: float,
    max_s: float,
) -> DrainAction:
    """When the copies of an auto-deleted model may be unloaded.

    The record is gone (NOT_FOUND) from the moment its last reference went, like ModelMesh;
    but requests that producers routed to it just before the switch may still sit in its
    queue or in a worker's buffer, and unloading with `fail_queued` would fail them. So the
    copies stay until: `grace_s` passed (a producer between its route check and its send),
    the queue was seen empty, and every live holder then reported, in a heartbeat written
    after that, nothing of the model buffered or in flight. Without a live copy it goes once
    `grace_s` passed. After `max_s` they go anyway. On UNLOAD the requests still queued that
    came through a vmodel move to its active model (mesh/control/vmodels.py
    `VModelManager._reroute`); the rest get a clear NOT_FOUND rather than waiting forever.
    `None` in `holders` means the worker has no heartbeat (dead).
    """
    live = {w: r for w, r in holders.items() if r is not None}
    if now - since >= max_s:
        return DrainAction.UNLOAD
    if now - since < grace_s:
        return DrainAction.WAIT  # even without a copy: what is still on its way gets re-routed too
    if not live:
        return DrainAction.UNLOAD
    if queue_depth > 0:
        return DrainAction.RESET if drained_at is not None else DrainAction.WAIT
    if drained_at is None:
        return DrainAction.MARK_DRAINED
    if all(r.updated_at > drained_at and r.pending == 0 for r in live.values()):
        return DrainAction.UNLOAD
    return DrainAction.WAIT
