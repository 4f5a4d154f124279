"""The Redis state store against a real Redis (no workers): registry, cold-path claims, copies."""

from __future__ import annotations

import json
import time

import pytest
import redis

from mesh.errors import AlreadyExists, FailedPrecondition
from mesh.models import CopyInfo, CopyState, ModelInfo, ModelRecord, ModelState, WorkerState
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.state import Placement, Route, Routed, StateStore
from mesh.tools.launcher import wait_for


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix, max_load_attempts=2))
    client.close()


INFO = ModelInfo(runtime="sklearn", uri="file:///models/a.joblib")


def heartbeat(store, name, ttl=30.0, **kw):
    st = WorkerState(name=name, host="h", pid=1, capacity_bytes=1000, used_bytes=0,
                     started_at=time.time(), updated_at=time.time(), **kw)
    store.write_heartbeat(st, ttl)


def test_register_is_idempotent_and_immutable(store):
    rec, created = store.register_model("a", INFO)
    assert created and rec.refs == 0
    again, created = store.register_model("a", INFO)
    assert not created and again == rec
    with pytest.raises(AlreadyExists):
        store.register_model("a", ModelInfo(runtime="onnx", uri="file:///models/a.onnx"))
    assert [r.model_id for r in store.list_records()] == ["a"]


def test_unregister_is_idempotent_and_refuses_referenced_models(store):
    store.register_model("a", INFO)
    store.mark_copy("a", "w1", CopyState.LOADED)
    assert store.unregister_model("a") == ["w1"]
    assert store.unregister_model("a") == []
    assert store.get_record("a") is None
    rec = ModelRecord(model_id="b", info=INFO, refs=1)
    store.r.hset(store.keys.models, "b", rec.model_dump_json())
    with pytest.raises(FailedPrecondition):
        store.unregister_model("b")


def test_unregister_returns_the_deleted_record_whose_created_at_is_its_generation(store):
    rec, _ = store.register_model("a", INFO)
    store.mark_copy("a", "w1", CopyState.LOADED)
    assert store.unregister("a") == (rec, ["w1"])
    assert store.unregister("a") == (None, [])
    again, _ = store.register_model("a", INFO)
    assert again.created_at > rec.created_at  # a new registration, a new generation


def test_a_copy_is_not_recorded_for_an_unregistered_model(store):
    assert store.mark_copy("ghost", "w1", CopyState.LOADED) is False
    assert store.r.exists(store.keys.copies("ghost")) == 0


def test_route_claims_once_and_sees_live_copies(store):
    assert store.route("a", "c1") is Route.NOT_FOUND
    store.register_model("a", INFO)
    assert store.route("a", "c1") is Route.CLAIMED
    assert store.route("a", "c2") is Route.PENDING  # c1 is placing the load
    heartbeat(store, "w1")
    assert store.place_load("a").worker == "w1"
    assert store.model_status("a").state is ModelState.LOADING
    assert store.route("a", "c2") is Route.SERVING
    store.mark_copy("a", "w1", CopyState.LOADED)
    assert store.r.exists(store.keys.load_claim("a")) == 0  # a finished load releases the claim
    assert store.model_status("a").state is ModelState.LOADED


def test_an_orphan_claim_needs_requests_still_queued(store):
    """A worker's orphan watch reads queue depths, then claims a round trip later: by then the
    copy that was leaving may have answered them. if_queued claims only while one still waits."""
    store.register_model("a", INFO)
    steps = [0, 5]
    assert store.route("a", "w1", priority_steps=steps, if_queued=True) is Route.IDLE
    assert store.r.exists(store.keys.load_claim("a")) == 0  # nothing claimed
    low_lane = store.keys.queue_list_keys(store.keys.model_queue("a"), steps)[-1]
    store.r.lpush(low_lane, "a request")
    assert store.route("a", "w1", priority_steps=steps, if_queued=True, max_queue=1) is Route.QUEUE_FULL
    assert store.route("a", "w1", priority_steps=steps, if_queued=True) is Route.CLAIMED
    store.r.delete(store.keys.load_claim("a"))
    store.mark_copy("a", "w2", CopyState.LOADED)
    heartbeat(store, "w2")
    assert store.route("a", "w1", priority_steps=steps, if_queued=True) is Route.SERVING


def round_trips(monkeypatch) -> list[str]:
    """Every round trip to Redis from now on: one per command sent alone, one per pipeline."""
    trips: list[str] = []
    command, execute = redis.Redis.execute_command, redis.client.Pipeline.execute

    def one(client, *args, **kw):
        if not isinstance(client, redis.client.Pipeline):
            trips.append(str(args[0]))
        return command(client, *args, **kw)

    def many(pipe, *args, **kw):
        trips.append("pipeline")
        return execute(pipe, *args, **kw)

    immediate = redis.client.Pipeline.immediate_execute_command

    def aside(pipe, *args, **kw):  # a command a pipeline sends alone (e.g. its SCRIPT EXISTS)
        trips.append(str(args[0]))
        return immediate(pipe, *args, **kw)

    monkeypatch.setattr(redis.Redis, "execute_command", one)
    monkeypatch.setattr(redis.client.Pipeline, "execute", many)
    monkeypatch.setattr(redis.client.Pipeline, "immediate_execute_command", aside)
    return trips


def test_unplace_undoes_a_placement_and_nothing_a_worker_did(store):
    """A placement whose load command could not be sent (`MeshClient._loads_refused`): its
    LOADING copy, claim and line entry go, and the model routes cold again; a copy the worker
    has marked LOADED, and a claim another holder took, stay."""
    store.register_model("a", INFO)
    heartbeat(store, "w1")
    assert store.route_and_place("a", "c1") == Routed(Route.CLAIMED, Placement("w1"))
    store.unplace("a", "w1")
    assert store.model_status("a").copies == [] and line(store, "w1") == []
    assert store.r.exists(store.keys.load_claim("a")) == 0
    assert store.route_and_place("a", "c2") == Routed(Route.CLAIMED, Placement("w1"))  # cold again, placed again

    store.mark_copy("a", "w1", CopyState.LOADED)
    store.r.set(store.keys.load_claim("a"), "w2")
    store.unplace("a", "w1")
    assert [(c.worker, c.state) for c in store.model_status("a").copies] == [("w1", CopyState.LOADED)]
    assert store.r.get(store.keys.load_claim("a")) == b"w2"
    store.r.hset(store.keys.copies("a"), "w3", "not json")  # any producer may write there
    store.unplace("a", "w3")
    assert store.r.hget(store.keys.copies("a"), "w3") == b"not json"
    store.r.set(store.keys.copies("b"), "a string")  # keys of another type: passed over
    store.r.hset(store.keys.load_claim("b"), "x", "y")
    store.r.set(store.keys.load_line("w3"), "a string")
    store.unplace("b", "w3")
    assert store.r.get(store.keys.copies("b")) == b"a string"


def test_a_cold_route_places_its_load_in_two_round_trips(store, monkeypatch):
    """route_and_place: the route script that claims the load also reads what placing it
    needs, so a cold request waits for two round trips (route, then the copy, claim and line
    written) instead of four (route, then place_load's three)."""
    store.register_model("a", INFO)
    heartbeat(store, "w1")
    heartbeat(store, "w2")
    store.record_failure("a", "w1", "boom")
    store.route("absent", "c0")  # the script is loaded: later calls are one round trip
    trips = round_trips(monkeypatch)
    assert store.route_and_place("a", "c1") == Routed(Route.CLAIMED, Placement("w2"))  # not where it failed
    assert len(trips) == 2, trips
    assert [(c.worker, c.state) for c in store.model_status("a").copies] == [("w2", CopyState.LOADING)]
    assert store.r.get(store.keys.load_claim("a")) == b"w2" and line(store, "w2") == ["a"]
    assert store.route_and_place("a", "c2") == Routed(Route.SERVING, loaded_for=None)
    store.register_model("b", INFO)
    store.record_failure("b", "w1", "boom 1")
    store.record_failure("b", "w2", "boom 2")
    routed = store.route_and_place("b", "c1")  # failed everywhere: fail fast, claim released
    assert routed == Routed(Route.CLAIMED, Placement(None, "boom 2"))
    assert store.r.exists(store.keys.load_claim("b")) == 0
    assert store.route_and_place("absent", "c1") == Routed(Route.NOT_FOUND)


def test_serving_says_how_long_the_oldest_live_copy_has_been_loaded(store):
    """What a producer's memory of a serving model is based on (a copy loaded a moment ago
    may be evicted the next moment under churn; mesh/control/routing.py `serving_memory_s`)."""
    store.register_model("a", INFO)
    heartbeat(store, "w1")
    heartbeat(store, "w2")
    store.mark_copy("a", "w1", CopyState.LOADING)
    assert store.route_and_place("a", "c1") == Routed(Route.SERVING, loaded_for=None)
    now = time.time()
    for worker, age in (("w1", 5.0), ("w2", 30.0)):
        copy = CopyInfo(worker=worker, state=CopyState.LOADED, since=now - age)
        store.r.hset(store.keys.copies("a"), worker, copy.model_dump_json())
    assert 30.0 <= store.route_and_place("a", "c1").loaded_for < 40.0  # the oldest copy's
    store.r.delete(store.keys.worker("w2"))  # w2 is gone: its copy no longer counts
    assert 5.0 <= store.route_and_place("a", "c1").loaded_for < 15.0
    assert store.route("a", "c1") is Route.SERVING


def test_queued_names_only_the_models_with_requests_waiting(store):
    steps = [0, 5]
    k = store.keys
    store.r.lpush(k.queue_list_keys(k.model_queue("b"), steps)[1], "x", "y")
    store.r.lpush(k.queue_list_keys(k.model_queue("d"), steps)[0], "z")
    assert store.queued(["a", "b", "c", "d"], steps) == {"b": 2, "d": 1}
    assert store.queued(["a"], steps) == {} and store.queued([], steps) == {}


def test_depth_reads_count_a_list_a_producer_squatted_as_empty(store):
    """Any producer may write a model queue's lists. One holding another type failed every
    depth read naming it: the orphan watch's and the batcher's probe, for all the models they
    ask about at once."""
    steps = [0, 5]
    k = store.keys
    store.r.lpush(k.queue_list_keys(k.model_queue("b"), steps)[1], "x", "y")
    store.r.set(k.queue_list_keys(k.model_queue("b"), steps)[0], "not a list")
    store.r.hset(k.queue_list_keys(k.model_queue("c"), steps)[1], "not", "a list")
    store.r.lpush(k.queue_list_keys(k.model_queue("d"), steps)[0], "z")
    assert store.queued(["a", "b", "c", "d"], steps) == {"b": 2, "d": 1}
    assert store.queue_depths(["a", "b", "c", "d"], steps) == {"a": 0, "b": 2, "c": 0, "d": 1}


def test_a_load_begun_with_a_ring_rings_that_queue(store):
    store.register_model("a", INFO)
    queue = store.keys.worker_queue("w1")
    assert store.begin_load("a", "w1", ring=queue).model_id == "a"
    assert store.r.lrange(store.keys.queue_bell(queue), 0, -1) == [b"1"]
    assert store.begin_load("ghost", "w1", ring=queue) is None


def test_a_load_is_begun_and_announced_in_one_round_trip_each(store, monkeypatch):
    """begin_load and mark_copy with a ring run the copy script in a pipeline: one round trip,
    not two (redis-py asks SCRIPT EXISTS before every pipeline that holds a Script call)."""
    store.register_model("a", INFO)
    heartbeat(store, "w0")
    heartbeat(store, "w1")
    queue = store.keys.worker_queue("w1")
    store.mark_copy("a", "w0", CopyState.LOADED)  # the script is loaded
    trips = round_trips(monkeypatch)
    assert store.begin_load("a", "w1", ring=queue).model_id == "a"
    assert len(trips) == 1, trips
    assert store.mark_copy("a", "w1", CopyState.LOADED, ring=queue) is True
    assert len(trips) == 2, trips
    assert {(c.worker, c.state) for c in store.model_status("a").copies} == {
        ("w0", CopyState.LOADED), ("w1", CopyState.LOADED)}


def test_a_script_redis_lost_is_loaded_again_and_the_pipeline_rerun(store):
    store.register_model("a", INFO)
    heartbeat(store, "w1")
    queue = store.keys.worker_queue("w1")
    store._mark_copy.sha = "0" * 40  # as after a Redis restart: no such script there
    assert store.begin_load("a", "w1", ring=queue).model_id == "a"
    assert [(c.worker, c.state) for c in store.model_status("a").copies] == [("w1", CopyState.LOADING)]
    store._mark_copy.sha = "0" * 40
    assert store.mark_copy("a", "w1", CopyState.LOADED, ring=queue) is True
    assert [(c.worker, c.state) for c in store.model_status("a").copies] == [("w1", CopyState.LOADED)]
    assert store.r.lrange(store.keys.queue_bell(queue), 0, -1) == [b"1"]


def test_a_claim_held_by_a_dead_worker_is_taken_over(store):
    store.register_model("a", INFO)
    store.r.set(store.keys.load_claim("a"), "dead-worker")
    store.r.hset(store.keys.copies("a"), "dead-worker", '{"worker":"dead-worker","state":"LOADING","since":1}')
    assert store.model_status("a").state is ModelState.NOT_LOADED
    assert store.route("a", "c1") is Route.CLAIMED


def test_place_load_fails_fast_once_every_worker_failed(store):
    store.register_model("a", INFO)
    heartbeat(store, "w1")
    heartbeat(store, "w2")
    store.record_failure("a", "w1", "boom 1")
    assert store.place_load("a").worker == "w2"  # one retry elsewhere
    store.record_failure("a", "w2", "boom 2")
    placement = store.place_load("a")
    assert placement.worker is None and placement.error == "boom 2"
    status = store.model_status("a")
    assert status.state is ModelState.LOADING_FAILED
    assert status.errors[0] == "boom 2" and {f.worker for f in status.failed_copies} == {"w1", "w2"}


def line(store, worker):
    return [m.decode() for m in store.r.zrange(store.keys.load_line(worker), 0, -1)]


def test_a_workers_line_of_loads_holds_the_loads_it_has_not_finished(store):
    for m in ("a", "b", "c", "d"):
        store.register_model(m, INFO)
    heartbeat(store, "w1")
    for m in ("a", "b", "c", "d"):
        assert store.place_load(m).worker == "w1"
    assert line(store, "w1") == ["a", "b", "c", "d"]
    assert 0 < store.r.pttl(store.keys.load_line("w1")) <= store.settings.load_timeout_s * 1000 + 5000
    store.mark_copy("a", "w1", CopyState.LOADING)
    assert "a" in line(store, "w1")  # still loading
    store.mark_copy("a", "w1", CopyState.LOADED)
    store.record_failure("b", "w1", "boom")
    store.remove_copy("c", "w1")  # given up (or evicted before it finished)
    assert line(store, "w1") == ["d"]
    store.remove_worker("w1", ["d"])
    assert store.r.exists(store.keys.load_line("w1")) == 0


def test_placement_reads_the_lines_live_and_skips_a_home_with_a_long_one(store):
    heartbeat(store, "w1")
    heartbeat(store, "w2")
    # heartbeats say the same (nothing loading, room for all); so a model goes where it fits
    # best, and then a long line of loads keeps the next loads off that worker
    models = [f"m{i}" for i in range(12)]
    for m in models:
        store.register_model(m, INFO)
    since = time.time()
    store.r.zadd(store.keys.load_line("w1"), {f"x{i}": since for i in range(5)})
    store.r.zadd(store.keys.load_line("w2"), {"old": since - store.settings.load_timeout_s - 1})
    _, lines = store._workers_and_lines(["w1", "w2"], time.time())
    assert lines == {"w1": 5, "w2": 0}  # an entry older than a load's timeout never counts
    assert {store.place_load(m).worker for m in models[:3]} == {"w2"}


def test_dead_workers_disappear_from_the_live_set(store):
    heartbeat(store, "w1", ttl=30)
    heartbeat(store, "w2", ttl=0.2)
    wait_for(lambda: not store.r.exists(store.keys.worker("w2")), timeout=5, what="w2's heartbeat to expire")
    assert [w.name for w in store.live_workers()] == ["w1"]
    store.remove_worker("w1")
    assert store.live_workers() == []


# ---------------------------------------------------------------------- reroute_queued


def _envelope(n: int, vmodel: str | None, model: str, keys: Keys) -> bytes:
    headers = {"id": f"t{n}", "mm-model-id": model}
    if vmodel is not None:
        headers["mm-vmodel-id"] = vmodel
    return json.dumps({
        "body": "e30=", "headers": headers,
        "properties": {"delivery_info": {"routing_key": keys.model_queue(model)}, "delivery_tag": f"d{n}"},
    }).encode()  # fmt: skip


def _ids(store, key) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in store.r.lrange(key, 0, -1)]


def _by_vmodel(message: dict) -> str | None:
    return {"va": "a2", "vb": "b2"}.get((message.get("headers") or {}).get("mm-vmodel-id"))


def test_reroute_moves_each_message_to_its_destination_in_order_and_rings_the_bells(store):
    k = store.keys
    src, a2, b2 = (k.queue_list_key(k.model_queue(m), 0) for m in ("old", "a2", "b2"))
    store.r.lpush(a2, _envelope(100, None, "a2", k))  # already queued there: served after the moved ones
    vmodels = ["va", "vb", None, "va", "vc", "vb", "va"]
    for n, vm in enumerate(vmodels):  # LPUSH like kombu: t0 is the oldest, at the consuming end
        store.r.lpush(src, _envelope(n, vm, "old", k))
    store.r.lpush(src, b"not json")
    assert store.reroute_queued("old", [0], _by_vmodel) == {"a2": 3, "b2": 2}
    # what stays keeps its order; each destination serves the moved ones oldest first
    # (RPOP takes from the right), before what it already held
    assert store.r.lpop(src) == b"not json"
    assert _ids(store, src)[::-1] == ["t2", "t4"]
    assert _ids(store, a2)[::-1] == ["t0", "t3", "t6", "t100"]
    assert _ids(store, b2)[::-1] == ["t1", "t5"]
    moved = json.loads(store.r.rpop(b2))
    assert moved["properties"]["delivery_info"]["routing_key"] == k.model_queue("b2")
    assert moved["headers"]["mm-model-id"] == "b2"
    for m in ("a2", "b2"):
        assert store.r.lrange(k.queue_bell(k.model_queue(m)), 0, -1) == [b"1"]
    assert store.r.exists(k.queue_bell(k.model_queue("old"))) == 0
    assert store.reroute_queued("old", [0], _by_vmodel) == {}  # nothing left to move
    assert _ids(store, src)[::-1] == ["t2", "t4"]


def test_reroute_moves_past_keys_a_producer_squatted(store):
    """Any producer may write a model queue's lists and bells. A string in the place of a
    destination list or bell failed the move script (WRONGTYPE), and a squatted source step
    failed the whole reroute: the cutover's requests stayed where nothing would serve them."""
    k = store.keys
    steps = [0, 3]
    src = k.queue_list_key(k.model_queue("old"), 0)
    for n, vm in enumerate(["va", "vb", "va"]):
        store.r.lpush(src, _envelope(n, vm, "old", k))
    store.r.set(k.queue_list_key(k.model_queue("old"), 3), "not a list")  # a source step
    store.r.set(k.queue_list_key(k.model_queue("a2"), 0), "not a list")  # a destination
    store.r.set(k.queue_bell(k.model_queue("b2")), "not a list")  # a destination's bell
    assert store.reroute_queued("old", steps, _by_vmodel) == {"a2": 2, "b2": 1}
    assert _ids(store, k.queue_list_key(k.model_queue("a2"), 0))[::-1] == ["t0", "t2"]
    assert _ids(store, k.queue_list_key(k.model_queue("b2"), 0)) == ["t1"]
    for m in ("a2", "b2"):
        assert store.r.lrange(k.queue_bell(k.model_queue(m)), 0, -1) == [b"1"]
    assert store.r.llen(src) == 0


def test_reroute_keeps_priorities_and_skips_messages_taken_meanwhile(store):
    k = store.keys
    steps = [0, 3, 6]
    for step in steps:
        for n in range(3):
            store.r.lpush(k.queue_list_key(k.model_queue("old"), step), _envelope(10 * step + n, "va", "old", k))
    taken = []

    def destination(message: dict) -> str | None:
        # a worker takes the oldest high-priority message between the read and the move
        if not taken:
            taken.append(store.r.rpop(k.queue_list_key(k.model_queue("old"), 0)))
        return _by_vmodel(message)

    assert store.reroute_queued("old", steps, destination) == {"a2": 8}
    assert json.loads(taken[0])["headers"]["id"] == "t0"
    for step in steps:
        assert store.r.llen(k.queue_list_key(k.model_queue("old"), step)) == 0
        want = [f"t{10 * step + n}" for n in range(3) if (step, n) != (0, 0)]
        assert _ids(store, k.queue_list_key(k.model_queue("a2"), step))[::-1] == want


def test_reroute_of_a_long_queue_moves_every_message_once(store):
    k = store.keys
    src = k.queue_list_key(k.model_queue("old"), 0)
    n = 20_000
    vmodels = ["va", "vb", None, "vc"]
    with store.r.pipeline(transaction=False) as p:
        for i in range(n):
            p.lpush(src, _envelope(i, vmodels[i % 4], "old", k))
        p.execute()
    assert store.reroute_queued("old", [0], _by_vmodel) == {"a2": n // 4, "b2": n // 4}
    assert _ids(store, src)[::-1] == [f"t{i}" for i in range(n) if i % 4 in (2, 3)]
    assert _ids(store, k.queue_list_key(k.model_queue("a2"), 0))[::-1] == [f"t{i}" for i in range(0, n, 4)]
    assert _ids(store, k.queue_list_key(k.model_queue("b2"), 0))[::-1] == [f"t{i}" for i in range(1, n, 4)]


def test_placement_parses_a_heartbeat_once_and_again_when_it_changes(store, monkeypatch):
    """A cold route's placement reads every worker's heartbeat and the model's record; the
    same bytes are parsed once (`StateStore._parsed`), a new heartbeat is parsed and placed on."""
    from mesh import models
    from mesh.store import state as state_mod

    parses = []
    original = models.WorkerState.model_validate_json.__func__

    def counting(cls, raw, *a, **kw):
        parses.append(raw)
        return original(cls, raw, *a, **kw)

    monkeypatch.setattr(models.WorkerState, "model_validate_json", classmethod(counting))
    for m in ("a", "b", "c"):
        store.register_model(m, INFO)
    def beat(name, used):
        store.write_heartbeat(WorkerState(name=name, host="h", pid=1, capacity_bytes=1000, used_bytes=used,
                                          started_at=time.time(), updated_at=time.time()), 30.0)  # fmt: skip

    beat("w1", 0)
    beat("w2", 900)  # w1 is chosen while it has the most room
    assert store.route_and_place("a", "c1").placement == Placement("w1")
    assert len(parses) == 2
    assert store.route_and_place("b", "c1").placement == Placement("w1")
    assert len(parses) == 2  # the same heartbeats: nothing parsed again
    beat("w1", 900)
    beat("w2", 0)  # now w2 has the room
    assert store.route_and_place("c", "c1").placement == Placement("w2")
    assert len(parses) == 4
    monkeypatch.setattr(state_mod, "PARSED_MAX", 2)
    beat("w1", 500)
    store._parsed(store._parsed_states, models.WorkerState, store.r.get(store.keys.worker("w1")))
    assert len(store._parsed_states) <= 2  # bounded: cleared past PARSED_MAX
