"""The vmodel store (mesh/store/vmodels.py) and transition driver (mesh/control/vmodels.py)
against a real Redis, no workers.

Workers are simulated by their heartbeats and copy records (what a worker writes), so every
state of a transition can be set up exactly; the commands sent to them just sit in their
queues (and are checked there where it matters).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mesh import MeshClient
from mesh.control.vmodels import DRAIN_GRACE_S, VModelManager
from mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
)
from mesh.models import (
    CopyState,
    FailedCopy,
    LoadedModel,
    ModelInfo,
    ModelState,
    VModelState,
    WorkerState,
)
from mesh.store.vmodels import DrainEntry

INFO = ModelInfo(runtime="sklearn", uri="file:///models/a.joblib")
INFO_B = ModelInfo(runtime="sklearn", uri="file:///models/b.joblib")


@pytest.fixture
def c(client: MeshClient) -> MeshClient:
    return client


def heartbeat(c: MeshClient, name: str, models: dict[str, int] | None = None, **kw) -> None:
    """A worker's heartbeat; `models` maps loaded model -> requests buffered there."""
    now = time.time()
    loaded = [
        LoadedModel(model_id=m, size_bytes=1, last_used=now, loaded_at=now, buffered=n)
        for m, n in (models or {}).items()
    ]
    st = WorkerState(
        name=name, host="h", pid=1, capacity_bytes=10**9, used_bytes=0, models=loaded,
        started_at=now, updated_at=now, **kw,
    )  # fmt: skip
    c.store.write_heartbeat(st, 60.0)


def loaded(c: MeshClient, model_id: str, *workers: str) -> None:
    for w in workers:
        assert c.store.mark_copy(model_id, w, CopyState.LOADED)


def refs(c: MeshClient) -> dict[str, int]:
    return {r.model_id: r.refs for r in c.list_models()}


def expected_refs(c: MeshClient) -> Counter:
    n: Counter = Counter()
    for vm in c.list_vmodels():
        n.update(vm.references)
    return n


def assert_refs_consistent(c: MeshClient) -> None:
    want = expected_refs(c)
    have = refs(c)
    assert {m: r for m, r in have.items() if r} == dict(want)
    assert set(want) <= set(have), "a vmodel references a model that is not registered"
    transitions = {k.decode(): v.decode() for k, v in c.store.r.hgetall(c.keys.transitions).items()}
    assert transitions == {v.vmodel_id: v.target_model_id for v in c.list_vmodels() if v.in_transition}


def commands(c: MeshClient, worker: str) -> int:
    """Commands waiting in a (simulated) worker's private queue."""
    steps = list(c.app.conf.broker_transport_options.get("priority_steps", [0]))
    keys = c.keys.queue_list_keys(c.keys.worker_queue(worker), steps)
    return sum(c.store.r.llen(k) for k in keys)


# ---------------------------------------------------------------- create and errors


def test_create_references_the_target_once(c):
    c.register_model("m1", INFO)
    st = c.set_vmodel("es", "m1")
    assert st.status is VModelState.DEFINED and st.transition_status == "UpToDate"
    assert (st.active_model_id, st.target_model_id, st.target_model_state) == ("m1", "m1", None)
    assert st.active_model_state is ModelState.NOT_LOADED and st.active_model_serving_state == "Standby"
    assert refs(c) == {"m1": 1}
    # steady state again: no write, no second reference
    c.set_vmodel("es", "m1")
    assert refs(c) == {"m1": 1}
    assert [v.vmodel_id for v in c.list_vmodels()] == ["es"]
    assert_refs_consistent(c)


def test_set_errors_follow_modelmesh(c):
    c.register_model("m1", INFO)
    with pytest.raises(InvalidArgument):
        c.set_vmodel("bad\x00id", "m1")
    with pytest.raises(InvalidArgument):
        c.set_vmodel("es", "")
    with pytest.raises(InvalidArgument):
        c.set_vmodel("es", "m9", model_info={"runtime": "sklearn", "uri": "http://x"})
    with pytest.raises(InvalidArgument):
        c.set_vmodel("es", "m9", model_info={"runtime": "nope", "uri": "file:///x"})
    with pytest.raises(ModelNotFound, match="target model 'm9' not found"):
        c.set_vmodel("es", "m9")
    with pytest.raises(AlreadyExists):
        c.set_vmodel("es", "m1", model_info=INFO_B)
    with pytest.raises(ModelNotFound, match="vmodel 'es' not found"):
        c.set_vmodel("es", "m1", update_only=True)
    with pytest.raises(FailedPrecondition):
        c.set_vmodel("es", "m1", expected_target_model_id="m0")
    assert c.list_vmodels() == [] and refs(c) == {"m1": 0}
    # expected == target: "create if absent"
    c.set_vmodel("es", "m1", expected_target_model_id="m1", owner="isvc")
    with pytest.raises(AlreadyExists):
        c.set_vmodel("es", "m1", owner="other")
    with pytest.raises(AlreadyExists):
        c.set_vmodel("es", "m1", owner="other", expected_target_model_id="m1")
    c.register_model("m2", INFO_B)
    with pytest.raises(FailedPrecondition):
        c.set_vmodel("es", "m2", expected_target_model_id="m0")
    c.set_vmodel("es", "m2", expected_target_model_id="m1")  # compare-and-set succeeds
    # current target == requested: fine whatever was expected (idempotent retry of a CAS)
    c.set_vmodel("es", "m2", expected_target_model_id="m1")
    assert c.get_vmodel_status("es").active_model_id == "m2"
    # no owner given: anyone may change it; the owner stays
    assert c.get_vmodel_status("es").owner == "isvc"
    assert_refs_consistent(c)


def test_unregister_of_a_referenced_model_fails(c):
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1")
    with pytest.raises(FailedPrecondition, match="referents"):
        c.unregister_model("m1")
    c.delete_vmodel("es")
    c.unregister_model("m1")
    assert c.get_model_status("m1").state is ModelState.NOT_FOUND


def test_model_info_registers_the_target_and_auto_delete_removes_it(c):
    st = c.set_vmodel("es", "es_1", model_info=INFO, auto_delete_target_model=True)
    assert st.status is VModelState.DEFINED
    assert c.store.get_record("es_1").auto_delete
    # no copy anywhere: the switch is immediate and es_1 goes with its last reference
    c.set_vmodel("es", "es_2", model_info=INFO_B, auto_delete_target_model=True)
    assert c.get_vmodel_status("es").active_model_id == "es_2"
    assert c.get_model_status("es_1").state is ModelState.NOT_FOUND
    # no copy to drain: the entry only waits out the grace period (a producer sending to es_1
    # right now), then goes; what reached es_1's queue meanwhile moves to es_2
    time.sleep(DRAIN_GRACE_S)
    c.vmodels.drain_all()
    assert c.store.r.hlen(c.keys.draining) == 0
    c.delete_vmodel("es")
    assert c.list_models() == [] and c.list_vmodels() == []
    c.delete_vmodel("es")  # idempotent


def test_existing_target_keeps_its_auto_delete_flag(c):
    """ModelMesh's documented quirk: reusing an existing model does not change its flag."""
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1", model_info=INFO, auto_delete_target_model=True)
    assert not c.store.get_record("m1").auto_delete
    c.delete_vmodel("es")
    assert c.store.get_record("m1") is not None


def test_auto_delete_without_model_info_is_ignored(c):
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1", auto_delete_target_model=True)
    c.delete_vmodel("es")
    assert c.store.get_record("m1").refs == 0


def test_owner_scopes_status_and_delete(c):
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1", owner="isvc")
    assert c.get_vmodel_status("es", owner="other").status is VModelState.NOT_FOUND
    assert c.get_vmodel_status("es", owner="isvc").status is VModelState.DEFINED
    c.delete_vmodel("es", owner="other")  # silently nothing
    assert c.get_vmodel_status("es").status is VModelState.DEFINED
    c.delete_vmodel("es", owner="isvc")
    st = c.get_vmodel_status("es")
    assert st.status is VModelState.NOT_FOUND and st.active_model_id == "" and st.transition_status is None
    assert refs(c) == {"m1": 0}


# ---------------------------------------------------------------- transitions


def test_retarget_waits_while_the_active_has_a_copy(c):
    heartbeat(c, "w1")
    heartbeat(c, "w2")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    st = c.set_vmodel("es", "m2")
    assert st.status is VModelState.TRANSITIONING and st.transition_status == "InProgress"
    assert (st.active_model_id, st.target_model_id) == ("m1", "m2")
    # the target load started at once: one copy (the active has one), one load command
    assert st.target_model_state is ModelState.LOADING and st.target_model_serving_state == "Loading"
    (copy,) = st.target_model_copies
    assert copy.state is CopyState.LOADING and commands(c, copy.worker) == 1
    assert st.copies == 2 and st.failed_copies == 0
    assert refs(c) == {"m1": 1, "m2": 1}
    assert_refs_consistent(c)
    # nothing new: advancing again places nothing more
    c.vmodels.advance("es")
    assert commands(c, "w1") + commands(c, "w2") == 1
    # the copy is loaded (what the worker reports): the worker hook completes the transition
    loaded(c, "m2", copy.worker)
    assert c.vmodels.advance_for_model("m2") == ["es"]
    st = c.get_vmodel_status("es")
    assert st.status is VModelState.DEFINED and st.active_model_id == "m2"
    assert refs(c) == {"m1": 0, "m2": 1}
    assert_refs_consistent(c)


def test_cutover_waits_for_copy_parity(c):
    for w in ("w1", "w2", "w3"):
        heartbeat(c, w)
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1", "w2")
    loaded(c, "m2", "w3")  # one copy: ModelMesh would switch right here
    st = c.set_vmodel("es", "m2")
    assert st.status is VModelState.TRANSITIONING
    placed = [x.worker for x in st.target_model_copies if x.state is CopyState.LOADING]
    assert len(placed) == 1 and placed[0] in ("w1", "w2")
    assert c.vmodels.advance_all() == []
    loaded(c, "m2", placed[0])
    assert c.vmodels.advance_all() == ["es"]
    assert c.get_vmodel_status("es").active_model_id == "m2"
    assert_refs_consistent(c)


def test_the_scheduler_run_drives_transitions(c):
    from mesh.control.rebalance import advance_vmodels

    heartbeat(c, "w1")
    heartbeat(c, "w2")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    (placed,) = [x.worker for x in c.set_vmodel("es", "m2").target_model_copies]
    assert advance_vmodels(c.app, c.store) == "[]"
    loaded(c, "m2", placed)
    assert advance_vmodels(c.app, c.store) == "['es']"
    assert c.get_vmodel_status("es").active_model_id == "m2"


def test_immediate_switch_when_target_already_has_parity(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    loaded(c, "m2", "w1")
    st = c.set_vmodel("es", "m2")
    assert st.status is VModelState.DEFINED and st.active_model_id == "m2"


def test_retarget_mid_transition_drops_the_abandoned_target(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    c.set_vmodel("es", "t1", model_info=INFO_B, auto_delete_target_model=True)
    assert c.get_vmodel_status("es").target_model_id == "t1"
    info_c = ModelInfo(runtime="sklearn", uri="file:///models/c.joblib")
    st = c.set_vmodel("es", "t2", model_info=info_c, auto_delete_target_model=True)
    assert (st.active_model_id, st.target_model_id) == ("m1", "t2")
    assert c.get_model_status("t1").state is ModelState.NOT_FOUND  # auto-deleted with its reference
    assert refs(c) == {"m1": 1, "t2": 1}
    # setting the target back to the active cancels; ModelMesh leaves a second reference on
    # the active here, which then can never be deleted
    st = c.set_vmodel("es", "m1")
    assert st.status is VModelState.DEFINED and refs(c) == {"m1": 1}
    assert c.get_model_status("t2").state is ModelState.NOT_FOUND
    assert_refs_consistent(c)
    c.delete_vmodel("es")
    c.unregister_model("m1")  # not leaked


def test_forced_reswitch_to_the_pending_target_does_not_leak_a_reference(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    c.set_vmodel("es", "m2")
    # the same target again, without force: nothing changes
    assert c.set_vmodel("es", "m2").status is VModelState.TRANSITIONING
    assert refs(c) == {"m1": 1, "m2": 1}
    st = c.set_vmodel("es", "m2", force=True)
    assert st.status is VModelState.DEFINED and st.active_model_id == "m2"
    assert refs(c) == {"m1": 0, "m2": 1}  # ModelMesh would have m2 at 2
    c.delete_vmodel("es")
    c.unregister_model("m2")


def test_forced_switch_loads_the_new_active_to_the_old_scale(c):
    for w in ("w1", "w2"):
        heartbeat(c, w)
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1", "w2")
    st = c.set_vmodel("es", "m2", force=True)
    assert st.status is VModelState.DEFINED
    assert sorted(x.worker for x in st.active_model_copies) == ["w1", "w2"]


def test_load_now_on_create_loads_one_copy(c):
    heartbeat(c, "w1")
    heartbeat(c, "w2")
    c.register_model("m1", INFO)
    st = c.set_vmodel("es", "m1", load_now=True)
    assert st.active_model_state is ModelState.LOADING and len(st.active_model_copies) == 1


def test_target_load_failure_blocks_then_retries_when_failures_expire(c):
    heartbeat(c, "w1")
    heartbeat(c, "w2")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    c.set_vmodel("es", "m2")
    # the load fails wherever it goes (what MeshWorker.load_failed does: record, retry
    # elsewhere) until no worker is left
    (first,) = [x.worker for x in c.get_vmodel_status("es").target_model_copies]
    worker = first
    while worker is not None:
        c.store.record_failure("m2", worker, "model file not found: /models/b.joblib")
        worker = c.store.place_load("m2", exclude=[worker]).worker
    c.vmodels.advance_all()
    st = c.get_vmodel_status("es")
    assert st.status is VModelState.TRANSITION_FAILED
    assert st.transition_status == "BlockedByFailedLoad"
    assert st.target_model_state is ModelState.LOADING_FAILED
    assert st.target_model_serving_state == "FailedToLoad"
    assert st.active_model_id == "m1" and st.failed_copies == 2 and st.copies == 3
    assert st.errors and "not found" in st.errors[0]
    # the failure records expire: the next tick retries and the transition is in progress again
    old = time.time() - c.settings.load_failure_expiry_s - 1
    for w in ("w1", "w2"):
        rec = FailedCopy(worker=w, error="model file not found", time=old)
        c.store.r.hset(c.keys.failures("m2"), w, rec.model_dump_json())
    before = commands(c, "w1") + commands(c, "w2")
    c.vmodels.advance_all()
    st = c.get_vmodel_status("es")
    assert st.status is VModelState.TRANSITIONING and st.target_model_state is ModelState.LOADING
    assert commands(c, "w1") + commands(c, "w2") == before + 1
    # a new set_vmodel to the same target, as ModelMesh Serving repeats it: no change
    assert c.set_vmodel("es", "m2").status is VModelState.TRANSITIONING
    assert_refs_consistent(c)


def test_sync_set_times_out_with_deadline_exceeded_and_keeps_the_change(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    with pytest.raises(DeadlineExceeded, match="still transitioning from 'm1' to 'm2'"):
        c.set_vmodel("es", "m2", sync=True, timeout=0.3)
    assert c.get_vmodel_status("es").status is VModelState.TRANSITIONING


def test_sync_returns_when_the_transition_is_blocked(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    c.store.record_failure("m2", "w1", "boom")  # a recent failure on the only worker
    st = c.set_vmodel("es", "m2", sync=True, timeout=30)
    assert st.status is VModelState.TRANSITION_FAILED


def test_delete_drops_active_and_target_references(c):
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.set_vmodel("es", "m1")
    c.set_vmodel("other", "m1")
    loaded(c, "m1", "w1")
    c.set_vmodel("es", "m2", model_info=INFO_B, auto_delete_target_model=True)
    assert refs(c) == {"m1": 2, "m2": 1}
    c.delete_vmodel("es")
    assert refs(c) == {"m1": 1}
    assert_refs_consistent(c)


# ---------------------------------------------------------------- draining auto-deleted copies


def test_auto_deleted_copies_are_unloaded_only_once_drained(c):
    heartbeat(c, "w1", {"es_1": 3})
    heartbeat(c, "w2")
    c.set_vmodel("es", "es_1", model_info=INFO, auto_delete_target_model=True)
    loaded(c, "es_1", "w1")
    c.set_vmodel("es", "es_2", model_info=INFO_B, auto_delete_target_model=True)
    loaded(c, "es_2", "w2")
    mgr = VModelManager(c.app, c.store, drain_grace_s=0.0, drain_max_s=600)
    assert mgr.advance_all() == ["es"]
    # the record is gone at once, like ModelMesh
    assert c.get_model_status("es_1").state is ModelState.NOT_FOUND
    entry = DrainEntry.model_validate_json(c.store.r.hget(c.keys.draining, "es_1"))
    assert entry.holders == ["w1"] and entry.drained_at is not None  # queue empty already seen
    # w1 still reports requests of es_1 buffered: its copy stays
    heartbeat(c, "w1", {"es_1": 3})
    assert mgr.drain_all() == [] and commands(c, "w1") == 0
    # they were answered (a heartbeat after the queue was seen empty says so): unload
    heartbeat(c, "w1", {"es_1": 0})
    assert mgr.drain_all() == ["es_1"]
    assert commands(c, "w1") == 1 and c.store.r.hlen(c.keys.draining) == 0


def test_drain_waits_for_queued_requests(c):
    heartbeat(c, "w1", {"es_1": 0})
    c.set_vmodel("es", "es_1", model_info=INFO, auto_delete_target_model=True)
    loaded(c, "es_1", "w1")
    c.store.r.rpush(c.keys.queue_list_keys(c.keys.model_queue("es_1"), [0])[0], b"{}")
    c.delete_vmodel("es")
    mgr = VModelManager(c.app, c.store, drain_grace_s=0.0, drain_max_s=600)
    for _ in range(3):
        assert mgr.drain_all() == []
    assert commands(c, "w1") == 0
    c.store.r.delete(c.keys.queue_list_keys(c.keys.model_queue("es_1"), [0])[0])
    assert mgr.drain_all() == []  # queue first seen empty now
    heartbeat(c, "w1", {"es_1": 0})
    assert mgr.drain_all() == ["es_1"] and commands(c, "w1") == 1


# ---------------------------------------------------------------- routing through a vmodel


def test_router_falls_back_to_the_target_when_the_active_vanished(c):
    """ModelMesh's `ModelMeshApi.callModel` (kserve/modelmesh ModelMeshApi.java): re-read the
    vmodel once; use the target if the active is still the
    one not found."""
    heartbeat(c, "w1")
    c.register_model("m1", INFO)
    c.register_model("m2", INFO_B)
    c.set_vmodel("es", "m1")
    loaded(c, "m1", "w1")
    c.set_vmodel("es", "m2")
    # simulate a registry that lost m1 under the router's feet
    c.store.r.hdel(c.keys.models, "m1")
    concrete, _ = c.router.route(None, "es")
    assert concrete == "m2"
    with pytest.raises(ModelNotFound):
        c.router.route("m1", None)
