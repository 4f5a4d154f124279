"""The cutover policy (mesh/policy/cutover.py): pure decisions over plain data."""

from __future__ import annotations

import itertools

import pytest

from mesh.models import CopyInfo, CopyState, FailedCopy, ModelState, ModelStatus
from mesh.policy.cutover import (
    Action,
    DrainAction,
    HolderReport,
    ModelView,
    copies_after_set,
    copies_needed,
    decide,
    drain_decision,
    may_switch_now,
)

W3 = frozenset({"w1", "w2", "w3"})


def view(loaded=(), loading=(), failed=(), claimed=False, registered=True) -> ModelView:
    return ModelView(
        registered=registered,
        loaded=frozenset(loaded),
        loading=frozenset(loading),
        load_claimed=claimed,
        failed_on=frozenset(failed),
    )


# ---------------------------------------------------------------- ModelView.from_status


def test_view_from_status_splits_copies_and_failures():
    status = ModelStatus(
        model_id="m",
        state=ModelState.LOADED,
        copies=[
            CopyInfo(worker="w1", state=CopyState.LOADED, since=1),
            CopyInfo(worker="w2", state=CopyState.LOADING, since=2),
        ],
        failed_copies=[FailedCopy(worker="w3", error="boom", time=3)],
        errors=["boom"],
    )
    v = ModelView.from_status(status)
    assert v.registered and v.loaded == {"w1"} and v.loading == {"w2"} and v.failed_on == {"w3"}
    assert v.holders == {"w1", "w2"} and v.has_copy and not v.load_claimed and v.loads_in_flight == 1


def test_view_from_status_claim_without_copy_is_a_load_in_flight():
    v = ModelView.from_status(ModelStatus(model_id="m", state=ModelState.LOADING))
    assert v.load_claimed and v.has_copy and v.loads_in_flight == 1 and not v.holders


@pytest.mark.parametrize(
    "state, registered, has_copy",
    [
        (ModelState.NOT_FOUND, False, False),
        (ModelState.NOT_LOADED, True, False),
        (ModelState.LOADING_FAILED, True, False),
    ],
)
def test_view_from_status_without_copies(state, registered, has_copy):
    v = ModelView.from_status(ModelStatus(model_id="m", state=state))
    assert v.registered is registered and v.has_copy is has_copy and v.loads_in_flight == 0


# ---------------------------------------------------------------- copies_needed


@pytest.mark.parametrize(
    "loaded, loading, claimed, workers, need",
    [
        (0, 0, False, 3, 0),  # active has no copy: nothing to protect
        (0, 0, False, 0, 0),
        (0, 1, False, 3, 1),  # only loading: one target copy
        (0, 0, True, 3, 1),  # only a claim: one target copy
        (1, 0, False, 3, 1),
        (2, 0, False, 3, 2),  # parity
        (3, 1, False, 3, 3),  # loading copies of the active do not raise the bar
        (3, 0, False, 2, 2),  # capped by the workers that can take a copy
        (2, 0, False, 0, 1),  # no eligible worker: still wait for one copy
    ],
)
def test_copies_needed(loaded, loading, claimed, workers, need):
    active = view(
        loaded=[f"a{i}" for i in range(loaded)], loading=[f"b{i}" for i in range(loading)], claimed=claimed
    )
    assert copies_needed(active, workers) == need


# ---------------------------------------------------------------- decide


def test_switch_at_once_when_active_has_no_copy():
    d = decide(active=view(), target=view(), workers=W3)
    assert d.action is Action.SWITCH


def test_switch_waits_for_copy_parity_not_just_one_copy():
    active = view(loaded=["w1", "w2"])
    # ModelMesh would switch here (one target copy loaded); its docs/vmodels.md promises parity
    d = decide(active=active, target=view(loaded=["w1"]), workers=W3)
    assert d.action is Action.LOAD and d.copies == 1
    d = decide(active=active, target=view(loaded=["w1"], loading=["w2"]), workers=W3)
    assert d.action is Action.WAIT
    d = decide(active=active, target=view(loaded=["w1", "w3"]), workers=W3)
    assert d.action is Action.SWITCH


def test_load_as_many_copies_as_missing_on_distinct_workers():
    active = view(loaded=["w1", "w2", "w3"])
    d = decide(active=active, target=view(), workers=W3)
    assert (d.action, d.copies) == (Action.LOAD, 3)
    d = decide(active=active, target=view(loading=["w2"]), workers=W3)
    assert (d.action, d.copies) == (Action.LOAD, 2)
    # only w3 is free of the target and of failures
    d = decide(active=active, target=view(loaded=["w1"], failed=["w2"]), workers=W3)
    assert (d.action, d.copies) == (Action.LOAD, 1)


def test_a_claim_counts_as_a_load_in_flight():
    d = decide(active=view(loaded=["w1"]), target=view(claimed=True), workers=W3)
    assert d.action is Action.WAIT


def test_switch_waits_while_a_copy_of_the_active_is_loading():
    # requests waiting for that load are in the active's queue: only it can answer them
    active = view(loaded=["w1"], loading=["w2"])
    d = decide(active=active, target=view(loaded=["w3"]), workers=W3)
    assert d.action is Action.WAIT and "active" in d.reason
    d = decide(active=view(loading=["w2"]), target=view(loaded=["w3"]), workers=W3)
    assert d.action is Action.WAIT
    d = decide(active=view(claimed=True), target=view(loaded=["w3"]), workers=W3)
    assert d.action is Action.WAIT
    d = decide(active=view(loaded=["w2"]), target=view(loaded=["w3"]), workers=W3)
    assert d.action is Action.SWITCH


def test_blocked_when_every_worker_failed_the_target():
    active = view(loaded=["w1"])
    d = decide(active=active, target=view(failed=["w1", "w2", "w3"]), workers=W3, max_load_attempts=5)
    assert d.action is Action.BLOCKED
    # already marked: stay quiet until the failure records expire
    d = decide(active=active, target=view(failed=W3), workers=W3, failed_flag=True)
    assert d.action is Action.WAIT and not d.clear_failed


def test_blocked_after_max_load_attempts_even_with_workers_left():
    workers = frozenset(f"w{i}" for i in range(6))
    target = view(failed=["w1", "w2", "w3"])
    d = decide(active=view(loaded=["w0"]), target=target, workers=workers, max_load_attempts=3)
    assert d.action is Action.BLOCKED
    d = decide(active=view(loaded=["w0"]), target=target, workers=workers, max_load_attempts=4)
    assert (d.action, d.copies) == (Action.LOAD, 1)


def test_failures_of_dead_workers_still_count_toward_max_attempts():
    d = decide(
        active=view(loaded=["w1"]), target=view(failed=["x1", "x2", "x3"]), workers=W3, max_load_attempts=3
    )
    assert d.action is Action.BLOCKED


def test_partial_target_blocked_when_parity_is_impossible():
    active = view(loaded=["w1", "w2", "w3"])
    d = decide(active=active, target=view(loaded=["w1", "w2"], failed=["w3"]), workers=W3)
    assert d.action is Action.BLOCKED


def test_not_blocked_while_a_load_is_in_flight():
    d = decide(active=view(loaded=["w1"]), target=view(loading=["w2"], failed=["w1", "w3"]), workers=W3)
    assert d.action is Action.WAIT


def test_retry_once_failures_expire_clears_the_flag():
    # the failure records expired: failed_on is empty again, the flag is still set
    d = decide(active=view(loaded=["w1"]), target=view(), workers=W3, failed_flag=True)
    assert d.action is Action.LOAD and d.copies == 1 and d.clear_failed
    # a load started by someone else also means the transition is moving again
    d = decide(active=view(loaded=["w1"]), target=view(loading=["w2"]), workers=W3, failed_flag=True)
    assert d.action is Action.WAIT and d.clear_failed


def test_no_worker_means_wait_not_failure():
    d = decide(active=view(loaded=["w1"]), target=view(), workers=frozenset())
    assert d.action is Action.WAIT and not d.clear_failed


def test_unregistered_target_waits():
    assert decide(active=view(loaded=["w1"]), target=view(registered=False), workers=W3).action is Action.WAIT


def test_decide_exhaustively_never_switches_below_parity_and_never_loads_onto_holders():
    """Every combination of copy states on three workers, for active and target."""
    states = ["none", "loaded", "loading", "failed"]
    for a_states, t_states in itertools.product(
        itertools.product(["none", "loaded", "loading"], repeat=3), itertools.product(states, repeat=3)
    ):
        names = sorted(W3)
        active = view(
            loaded=[w for w, s in zip(names, a_states) if s == "loaded"],
            loading=[w for w, s in zip(names, a_states) if s == "loading"],
        )
        target = view(
            loaded=[w for w, s in zip(names, t_states) if s == "loaded"],
            loading=[w for w, s in zip(names, t_states) if s == "loading"],
            failed=[w for w, s in zip(names, t_states) if s == "failed"],
        )
        for flag in (False, True):
            d = decide(active=active, target=target, workers=W3, failed_flag=flag, max_load_attempts=3)
            need = copies_needed(active, 3)
            if d.action is Action.SWITCH:
                assert len(target.loaded) >= need
                assert not active.loading
            if len(target.loaded) >= need and not active.loading:
                assert d.action is Action.SWITCH
            if d.action is Action.LOAD:
                free = W3 - target.holders - target.failed_on
                assert 1 <= d.copies <= len(free)
                assert len(target.loaded) + target.loads_in_flight + d.copies <= need
            if d.action is Action.BLOCKED:
                assert not flag and target.failed_on and not target.loading
            if d.clear_failed:
                assert flag


# ---------------------------------------------------------------- may_switch_now (set_vmodel)


def test_may_switch_now_follows_modelmesh_rules_plus_parity():
    assert may_switch_now(view(loaded=["w1", "w2"]), view(), W3, force=True)
    assert may_switch_now(view(), view(), W3, force=False)  # active has no copy
    assert may_switch_now(view(loaded=["w1"]), view(loaded=["w2"]), W3, force=False)  # ModelMesh's 1 & LOADED
    assert not may_switch_now(view(loaded=["w1"]), view(loading=["w2"]), W3, force=False)
    # ModelMesh never switches at once above one copy; parity does when the target has them
    assert not may_switch_now(view(loaded=["w1", "w2"]), view(loaded=["w3"]), W3, force=False)
    assert may_switch_now(view(loaded=["w1", "w2"]), view(loaded=["w2", "w3"]), W3, force=False)


# ---------------------------------------------------------------- copies_after_set


@pytest.mark.parametrize(
    "previous, load_now, workers, n",
    [(0, False, 3, 0), (0, True, 3, 1), (2, False, 3, 2), (2, True, 3, 2), (5, False, 2, 2), (1, True, 0, 1)],
)
def test_copies_after_set(previous, load_now, workers, n):
    assert copies_after_set(previous, load_now, workers) == n


# ---------------------------------------------------------------- drain_decision


def drain(**kw):
    base = dict(since=100.0, drained_at=None, now=110.0, queue_depth=0, grace_s=1.0, max_s=60.0)
    base.update(kw)
    base.setdefault("holders", {"w1": HolderReport(updated_at=109.0, pending=0)})
    return drain_decision(**base)


def test_drain_no_live_holder_unloads_once_the_grace_period_passed():
    # requests a producer is sending right now must find the drain still pending: on UNLOAD
    # the queued ones move to the vmodel's new active (they would fail NOT_FOUND after it)
    assert drain(holders={}, now=100.0) is DrainAction.WAIT
    assert drain(holders={"w1": None}, now=100.5, queue_depth=5) is DrainAction.WAIT
    assert drain(holders={}, now=101.0) is DrainAction.UNLOAD
    assert drain(holders={"w1": None}, now=101.0, queue_depth=5) is DrainAction.UNLOAD


def test_drain_waits_for_the_grace_period():
    assert drain(now=100.5) is DrainAction.WAIT


def test_drain_needs_an_empty_queue_then_a_later_quiet_heartbeat():
    assert drain(queue_depth=3) is DrainAction.WAIT
    assert drain(queue_depth=3, drained_at=105.0) is DrainAction.RESET
    assert drain() is DrainAction.MARK_DRAINED
    # heartbeat older than the moment the queue was seen empty: not yet proof
    assert drain(drained_at=109.5) is DrainAction.WAIT
    assert drain(drained_at=108.0) is DrainAction.UNLOAD
    busy = {"w1": HolderReport(updated_at=109.0, pending=2)}
    assert drain(drained_at=108.0, holders=busy) is DrainAction.WAIT
    mixed = {"w1": HolderReport(updated_at=109.0, pending=0), "w2": None}
    assert drain(drained_at=108.0, holders=mixed) is DrainAction.UNLOAD


def test_drain_gives_up_after_max_s():
    busy = {"w1": HolderReport(updated_at=159.0, pending=2)}
    assert drain(now=160.0, queue_depth=4, holders=busy) is DrainAction.UNLOAD
    assert drain(now=159.0, queue_depth=4, holders=busy) is DrainAction.WAIT
