"""The model manager in the test process, against a real Redis and in-memory ports
(tests/unit/fakes.py): single-flight loads, eviction by the retention policy and in the order
docs/architecture.md gives, a copy with a batch in flight outliving its unload, load failures.

Models are `python`-runtime `Slow` models (tests/faults/fault_models.py): their size is what
their spec says, and a gate file holds their load for as long as a test needs.
"""

from __future__ import annotations

import json
import threading

import pytest

from mesh.errors import ModelNotFound
from mesh.models import CopyState, ModelInfo
from mesh.tools.launcher import wait_for
from tests.unit.worker_rig import MB, SLOW, WORKER, Rig


@pytest.fixture
def rig(redis_url, prefix, tmp_path):
    r = Rig(redis_url, prefix, tmp_path)
    yield r
    r.close()


def test_a_load_announces_its_copy_opens_its_buffer_and_consumes(rig):
    rig.register("a")
    rig.load("a")
    assert rig.manager.loaded_ids() == ["a"]
    assert rig.store.model_status("a").copies[0].state == CopyState.LOADED
    assert rig.batcher.is_open("a")
    assert ("consume", "a") in rig.consumer.log
    loaded, loading, used = rig.manager.snapshot()
    assert [m.model_id for m in loaded] == ["a"] and loading == [] and used == MB


class Req:
    def __init__(self, id: str) -> None:
        self.id = id


def loaded_then_unloaded(rig, model_id: str, **spec) -> None:
    rig.register(model_id, **spec)
    rig.load(model_id)
    rig.manager.request_unload(model_id)
    rig.events.wait_for(("unloaded", model_id, False))
    rig.consumer.log.clear()


def test_a_reload_takes_its_models_requests_in_from_its_start(rig):
    """A model this worker loaded before: its queue is consumed from the start of the reload,
    its requests held until the model is installed and batched at once then (not consumed
    only once the copy is LOADED, which put a mark, a wake-up and a pop between the load and
    its first request)."""
    gate = rig.tmp / "gate"
    loaded_then_unloaded(rig, "a", gate=str(gate))
    gate.touch()
    rig.manager.request_load("a")
    assert ("consume", "a") in rig.consumer.log  # before the load is done
    assert rig.batcher.add("a", Req("r1"))
    assert rig.batcher.take(timeout=0.05) is None  # nothing could answer it yet
    gate.unlink()
    batch = rig.batcher.take(timeout=30)
    assert batch.model_id == "a" and [p.req.id for p in batch.items] == ["r1"]
    entry = rig.manager.acquire("a")  # installed by the time its requests are batched
    assert entry is not None
    rig.manager.release(entry)
    rig.events.wait_for(("loaded", "a"))


def test_a_first_load_takes_no_request_in_before_it_is_installed(rig):
    """A worker that dies takes the requests it took in with it until the visibility timeout,
    and a first load is when a model may take its worker down: they wait in Redis."""
    gate = rig.tmp / "gate"
    gate.touch()
    rig.register("a", gate=str(gate))
    rig.manager.request_load("a")
    wait_for(lambda: rig.manager.snapshot()[1] == ["a"], 10, what="the load to start")
    assert ("consume", "a") not in rig.consumer.log and not rig.batcher.add("a", Req("r1"))
    gate.unlink()
    rig.events.wait_for(("loaded", "a"))
    assert ("consume", "a") in rig.consumer.log


def test_a_reload_that_fails_gives_back_the_requests_it_took_in(rig):
    gate = rig.tmp / "gate"
    loaded_then_unloaded(rig, "x", gate=str(gate))
    (rig.tmp / "x.json").write_text(json.dumps({"size": 10 * MB, "gate": str(gate)}))  # too big now
    gate.touch()
    rig.manager.request_load("x")
    rig.batcher.add("x", Req("r1"))
    gate.unlink()
    rig.events.wait_for(("load_failed", "x"))
    # back on their queue before the failure is handled (a retry elsewhere answers them)
    log = rig.consumer.log
    assert log.index(("stop_consuming", "x")) < log.index(("requeue", ["r1"]))
    assert not rig.batcher.is_open("x")


def test_a_model_registered_again_as_another_is_loaded_as_a_first_load(rig):
    gate = rig.tmp / "gate"
    loaded_then_unloaded(rig, "a")
    rig.store.unregister_model("a")  # this worker held no copy: it was not told
    path = rig.tmp / "a2.json"
    path.write_text(json.dumps({"size": MB, "gate": str(gate)}))
    rig.store.register_model("a", ModelInfo(runtime="python", uri=f"file://{path}", python_class=SLOW))
    gate.touch()
    rig.manager.request_load("a")  # taken for a reload at first
    rig.batcher.add("a", Req("r1"))
    wait_for(lambda: ("requeue", ["r1"]) in rig.consumer.log, 10, what="the held request to go back")
    assert not rig.batcher.is_open("a")
    gate.unlink()
    # the first registration's load reported "loaded" already
    wait_for(lambda: rig.events.count(("loaded", "a")) == 2, 10, what="the new registration's load")


def test_loads_are_single_flight(rig):
    gate = rig.tmp / "gate"
    gate.touch()
    rig.register("a", gate=str(gate))
    threads = [threading.Thread(target=rig.manager.request_load, args=("a",)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rig.manager.snapshot()[1] == ["a"]  # one load, held at the gate
    gate.unlink()
    rig.events.wait_for(("loaded", "a"))
    rig.events.no_more_than(("loaded",), 1, within=0.5)  # a duplicate would follow at once
    assert rig.loads_counted("a") == 1


def test_the_least_used_model_is_evicted_in_order(rig):
    for m in "abc":
        rig.register(m)
    rig.load("a")
    rig.load("b")
    # both answered (a fresh copy, one that answered nothing yet, is kept by other rules:
    # tests/unit/test_retention.py); a answered more
    rig.manager.release(rig.manager.acquire("a", requests=5))
    rig.manager.release(rig.manager.acquire("b", requests=1))
    rig.consumer.log.clear()
    rig.register("d")
    rig.load("c")
    rig.load("d")  # 4 MB wanted, 3 MB room: the least used goes
    rig.events.wait_for(("unloaded", "b", False))
    assert sorted(rig.manager.loaded_ids()) == ["a", "c", "d"]
    # stop intake, requeue what was buffered, unload, update Redis (docs/architecture.md)
    log = rig.consumer.log
    assert log.index(("stop_consuming", "b")) < log.index(("requeue", []))
    assert [c.worker for c in rig.store.model_status("b").copies] == []
    assert [c.worker for c in rig.store.model_status("a").copies] == [WORKER]


def test_buffered_requests_of_an_evicted_model_are_requeued(rig):
    for m in "ab":
        rig.register(m, size=2 * MB)
    rig.load("a")

    class Req:
        id = "r1"

    rig.batcher.add("a", Req())
    rig.load("b")  # a (2 MB) must leave for b (2 MB) in 3 MB
    rig.events.wait_for(("unloaded", "a", False))
    assert [p.req.id for p in rig.consumer.requeued] == ["r1"]
    assert not rig.batcher.is_open("a")


def test_a_copy_with_a_batch_in_flight_is_unloaded_only_after_it(rig):
    rig.register("a")
    rig.load("a")
    entry = rig.manager.acquire("a")
    assert entry is not None
    rig.manager.request_unload("a")
    # the retirement has stopped intake and requeued the buffer: next it waits for the batch
    wait_for(lambda: ("requeue", []) in rig.consumer.log, 10, what="the retirement to start")
    rig.events.no_more_than(("unloaded",), 0, within=0.5)
    assert entry.loaded is not None, "unloaded under a running batch"
    rig.manager.release(entry)
    rig.events.wait_for(("unloaded", "a", False))
    assert entry.loaded is None
    assert rig.store.model_status("a").copies == []


def test_an_unregistered_model_fails_its_requests_then_unloads(rig):
    rig.register("a")
    rig.load("a")
    rig.manager.request_unload("a", ModelNotFound("model 'a' was unregistered"))
    rig.events.wait_for(("unloaded", "a", True))
    failed = [e for e in rig.events.log if e[0] == "fail_model"]
    assert failed and failed[0][1] == "a" and isinstance(failed[0][2], ModelNotFound)


def test_a_model_unregistered_while_it_loads_hands_back_what_it_took_in_rather_than_fail_it(rig):
    """Auto-deleted by a vmodel cutover mid-load: its requests taken in meanwhile may belong to
    the vmodel's new active (the stray sweep moves them there); failing them "was unregistered"
    lost one request of the soak."""
    gate = rig.tmp / "gate-a"
    gate.touch()
    rig.register("a", gate=str(gate))  # the load waits for the gate to go
    rig.manager.request_load("a")
    wait_for(lambda: rig.store.model_status("a").copies, 10, what="the copy to be LOADING")
    rig.store.unregister_model("a")
    gate.unlink()
    rig.events.wait_for(("unloaded", "a", False))
    assert not [e for e in rig.events.log if e[0] == "fail_model"]
    assert rig.store.model_status("a").copies == []


def test_a_failed_load_is_reported_and_forgotten(rig):
    rig.store.register_model("bad", ModelInfo(runtime="python", uri=f"file://{rig.tmp}/missing.json",
                                              python_class=SLOW))  # fmt: skip
    rig.manager.request_load("bad")
    rig.events.wait_for(("load_failed", "bad"))
    assert rig.manager.snapshot()[1] == []
    assert rig.metrics.loads.labels("bad", "failed")._value.get() == 1
    rig.register("bad2")  # the line goes on after a failure
    rig.load("bad2")


def test_a_model_larger_than_the_worker_fails_with_the_reason(rig):
    rig.register("huge", size=10 * MB)
    rig.manager.request_load("huge")
    rig.events.wait_for(("load_failed", "huge"))
    message = next(e[2] for e in rig.events.log if e[0] == "load_failed")
    assert "capacity" in message and "MESH_WORKER_CAPACITY_BYTES" in message


def test_a_model_not_registered_is_not_loaded_and_not_a_failure(rig):
    rig.manager.request_load("ghost")
    wait_for(lambda: rig.manager.snapshot()[1] == [], 10, what="the load to end")
    rig.events.no_more_than(("load_failed",), 0, within=0.3)
    assert rig.events.log == []


def test_a_duplicate_load_command_reasserts_the_copy(rig):
    rig.register("a")
    rig.load("a")
    rig.store.remove_copy("a", WORKER)  # the record vanished (e.g. Redis restored from a snapshot)
    rig.manager.request_load("a")
    wait_for(lambda: rig.store.model_status("a").copies, 10, what="the copy announced again")
    assert [c.worker for c in rig.store.model_status("a").copies] == [WORKER]
    assert rig.loads_counted("a") == 1


def test_a_load_for_a_model_registered_again_replaces_the_old_copy(rig):
    """Unregistered and registered again, then asked for before the old registration's unload
    reached this worker: the load was taken for a duplicate of the copy held, dropped, and the
    new model stayed LOADING for good (its claim held; test_metadata in a clean-clone CI run)."""
    rig.register("m", size=MB)
    rig.load("m")
    first = rig.manager.loaded_records()["m"].created_at
    rig.store.unregister_model("m")
    rig.register("m", size=MB)
    rig.manager.request_load("m")  # the new registration's load, before any unload command
    wait_for(lambda: rig.events.count(("loaded", "m")) == 2, 20, what="the new registration's load")
    assert rig.events.count(("unloaded", "m")) == 1
    assert rig.manager.loaded_records()["m"].created_at != first
    wait_for(lambda: rig.store.model_status("m").state.value == "LOADED", 10, what="the copy to be marked LOADED")
