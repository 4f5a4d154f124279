"""The stray sweep's store (mesh/store/strays.py) against a real Redis, and the sweeper
(workers/strays.py) with a recording result backend: requests queued for a model that is not
registered are taken after the grace and answered NOT_FOUND; registered, draining or
re-registered models keep theirs."""

from __future__ import annotations

import json

import pytest
import redis

from mesh.errors import ModelNotFound
from mesh.models import ModelInfo
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.state import StateStore
from mesh.store.strays import StrayStore
from workers.strays import StraySweeper, stray_request

STEPS = [0, 5]
INFO = ModelInfo(runtime="sklearn", uri="file:///models/a.joblib")
REPLY = "f" * 32


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def keys(prefix):
    return Keys(prefix)


@pytest.fixture
def strays(r, keys):
    return StrayStore(r, keys, STEPS)


@pytest.fixture
def state(r, keys, prefix):
    return StateStore(r, keys, MeshSettings(prefix=prefix))


class Backend:
    def __init__(self) -> None:
        self.failed: list[tuple[str, Exception, str | None]] = []

    def mark_as_failure(self, task_id, exc, request=None):
        self.failed.append((task_id, exc, request.reply_to))


def envelope(keys: Keys, task_id: object, model: str, reply_to: object = None) -> bytes:
    return json.dumps({
        "body": "e30=", "headers": {"id": task_id, "mm-model-id": model},
        "properties": {"reply_to": reply_to or keys.reply_list(REPLY),
                       "delivery_info": {"routing_key": keys.model_queue(model)}},
    }).encode()  # fmt: skip


def push(r, keys, model, *task_ids, priority=0):
    for t in task_ids:
        r.lpush(keys.queue_list_key(keys.model_queue(model), priority), envelope(keys, t, model))


def sweeper(strays, backend, grace=0.0, token="me"):
    return StraySweeper(strays, lambda: backend, token=token, interval_s=60, grace_s=grace, scan_keys=10_000)


def test_requests_of_an_unregistered_model_are_answered_not_found_oldest_first(r, keys, strays, state):
    state.register_model("live", INFO)
    push(r, keys, "live", "l1")
    push(r, keys, "gone", "g1", "g2")
    push(r, keys, "gone", "g3", priority=5)
    backend = Backend()
    assert sweeper(strays, backend).sweep() == 3
    assert sorted(t for t, _, _ in backend.failed) == ["g1", "g2", "g3"]
    assert [t for t, _, _ in backend.failed][:2] == ["g1", "g2"]  # same list: oldest first
    assert all(isinstance(e, ModelNotFound) and "gone" in str(e) for _, e, _ in backend.failed)
    assert {to for _, _, to in backend.failed} == {keys.reply_list(REPLY)}
    assert r.llen(keys.queue_list_key(keys.model_queue("live"), 0)) == 1  # registered: untouched
    assert not r.exists(keys.strays_held, keys.strays, keys.queue_list_key(keys.model_queue("gone"), 0))


def test_a_model_registered_again_within_the_grace_keeps_its_requests(r, keys, strays, state):
    push(r, keys, "m", "t1")
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=3600) == -1  # first seen
    assert r.hexists(keys.strays, "m")
    state.register_model("m", INFO)
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=0) == 0
    assert not r.hexists(keys.strays, "m")  # forgotten: a later unregister starts a new grace
    assert r.llen(keys.queue_list_key(keys.model_queue("m"), 0)) == 1


def test_requests_wait_out_the_grace_measured_from_when_they_were_first_seen(r, keys, strays):
    push(r, keys, "m", "t1")
    lists = strays.candidates(10_000)["m"]
    assert strays.take_if_stray("m", lists, grace_s=3600) == -1
    assert strays.take_if_stray("m", lists, grace_s=3600) == -1
    seconds, _ = r.time()
    r.hset(keys.strays, "m", seconds - 3601)  # seen an hour ago
    assert strays.take_if_stray("m", lists, grace_s=3600) == 1
    assert r.llen(keys.strays_held) == 1 and not r.hexists(keys.strays, "m")


def test_a_draining_model_keeps_its_requests(r, keys, strays):
    r.hset(keys.draining, "m", "{}")  # auto-deleted, its copies still answering its queue
    push(r, keys, "m", "t1")
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=0) == 0
    assert r.llen(keys.queue_list_key(keys.model_queue("m"), 0)) == 1


def test_an_entry_whose_queue_emptied_is_forgotten(r, keys, strays):
    push(r, keys, "m", "t1")
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=3600) == -1
    r.delete(keys.queue_list_key(keys.model_queue("m"), 0))  # a copy answered it meanwhile
    assert "m" in strays.candidates(10_000)  # found from the entry
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=0) == 0
    assert not r.exists(keys.strays)


def test_one_sweep_per_interval_in_the_pool_and_a_sweep_that_lost_its_lock_leaves_the_rest(r, keys, strays):
    push(r, keys, "gone", "g1")
    first, second = Backend(), Backend()
    assert sweeper(strays, first, token="a").sweep() == 1
    push(r, keys, "gone", "g2")
    assert sweeper(strays, second, token="b").sweep() == 0  # a's lock still spaces the sweeps
    assert second.failed == []
    r.set(keys.strays_lock, "b")
    assert strays.take_if_stray("gone", strays.candidates(10_000)["gone"], grace_s=0) == 1
    # a's answers are not dropped from the held list once b holds the lock: b answers again
    assert strays.answer_held("a", lambda raw: None) == 0
    assert r.llen(keys.strays_held) == 1
    assert strays.answer_held("b", lambda raw: None) == 1
    assert not r.exists(keys.strays_held)


def test_messages_without_a_usable_id_are_dropped_and_do_not_stop_the_sweep(r, keys, strays):
    queue = keys.queue_list_key(keys.model_queue("gone"), 0)
    r.lpush(queue, b"not json", envelope(keys, None, "gone"), envelope(keys, 7, "gone"),
            envelope(keys, "x\ud800", "gone"), b"[" * 100_000)  # fmt: skip
    push(r, keys, "gone", "good")
    backend = Backend()
    sweeper(strays, backend).sweep()
    assert [t for t, _, _ in backend.failed] == ["good"]
    assert not r.exists(keys.strays_held, queue)


def test_a_queue_name_that_is_no_valid_model_id_is_swept_too(r, keys, strays):
    bad = f"{keys.kombu_prefix}{keys.prefix}.model.no such/model\xff".encode("latin-1")
    r.lpush(bad, envelope(keys, "t1", "x"))
    backend = Backend()
    sweeper(strays, backend).sweep()
    assert [t for t, _, _ in backend.failed] == ["t1"]
    assert not r.exists(bad)


@pytest.mark.parametrize("model_id", ["模型", "modèle 🤖", "a b:c*d/e?f%g"])
def test_utf8_ids_are_swept_watched_and_kept_like_any_other(r, keys, strays, state, model_id):
    state.register_model("live " + model_id, INFO)
    push(r, keys, "live " + model_id, "l1")
    push(r, keys, model_id, "g1", "g2")
    backend = Backend()
    assert sweeper(strays, backend).sweep() == 2
    assert sorted(t for t, _, _ in backend.failed) == ["g1", "g2"]
    assert all(model_id in str(e) for _, e, _ in backend.failed)
    assert r.llen(keys.queue_list_key(keys.model_queue("live " + model_id), 0)) == 1
    # unregistered: watched under its own id (a UTF-8 member of `gone`), until nothing can come back
    state.unregister_model("live " + model_id)
    assert "live " + model_id in strays.candidates(10_000)
    push(r, keys, "live " + model_id, "back")  # a request put back after the unregister
    r.delete(keys.strays_lock)  # the lock spaces sweeps: the next one now
    assert sweeper(strays, backend, grace=10).sweep() == 0  # waits out the grace
    assert r.hexists(keys.strays, "live " + model_id)
    r.delete(keys.strays_lock)
    assert sweeper(strays, backend, grace=0).sweep() == 2
    assert {"l1", "back"} <= {t for t, _, _ in backend.failed}


def test_a_queue_name_under_the_model_queues_that_decodes_to_no_id_is_swept_as_itself(r, keys, strays, state):
    state.register_model("m", INFO)
    # a made-up escape of "m": it must not be taken for m's queue (nobody consumes it)
    for tail in ("%6D", "%zz", "%C3"):
        r.lpush(f"{keys.kombu_prefix}{keys.prefix}.model.{tail}", envelope(keys, f"t{tail}", "x"))
    push(r, keys, "m", "kept")
    backend = Backend()
    assert sweeper(strays, backend).sweep() == 3
    assert sorted(t for t, _, _ in backend.failed) == ["t%6D", "t%C3", "t%zz"]
    assert r.llen(keys.queue_list_key(keys.model_queue("m"), 0)) == 1
    assert not r.exists(keys.strays, keys.strays_held)


def test_stray_request_reads_id_reply_address_and_model():
    keys = Keys("p")
    req = stray_request(envelope(keys, "t1", "m"), keys.model_from_queue)
    assert req == ("t1", keys.reply_list(REPLY), "m")
    assert stray_request(envelope(keys, "t1", "m", reply_to=["x"]), keys.model_from_queue).reply_to is None
    assert stray_request(b"{}", keys.model_from_queue) is None
    assert stray_request(b"[1]", keys.model_from_queue) is None


def test_an_unregistered_model_is_watched_until_none_of_its_requests_can_come_back(r, keys, strays, state):
    state.register_model("m", INFO)
    state.unregister_model("m")
    assert r.zscore(keys.gone, "m") is not None
    lists = strays.candidates(10_000)["m"]  # watched, though its queue is empty
    # an unacked message of its queue (a worker holds it, or held it and died): kept watching
    r.hset(keys.unacked, "tag1", json.dumps([json.loads(envelope(keys, "t1", "m")), "", keys.model_queue("m")]))
    assert strays.unacked_queues() == {keys.model_queue("m")}
    seconds, _ = r.time()
    r.zadd(keys.gone, {"m": seconds - 60})
    assert strays.take_if_stray("m", lists, grace_s=10, unacked=True) == 0
    assert r.zscore(keys.gone, "m") is not None
    # none, but it went less than a grace ago (a producer may still enqueue): kept
    r.zadd(keys.gone, {"m": seconds})
    assert strays.take_if_stray("m", lists, grace_s=10, unacked=False) == 0
    assert r.zscore(keys.gone, "m") is not None
    r.zadd(keys.gone, {"m": seconds - 60})
    assert strays.take_if_stray("m", lists, grace_s=10, unacked=False) == 0
    assert not r.exists(keys.gone)


def test_a_model_registered_again_is_no_longer_watched(r, keys, strays, state):
    state.register_model("m", INFO)
    state.unregister_model("m")
    state.register_model("m", INFO)
    assert strays.take_if_stray("m", strays.candidates(10_000)["m"], grace_s=0) == 0
    assert not r.exists(keys.gone)


def test_the_scan_resumes_where_it_stopped(r, keys, strays):
    # filler keys, so that one slice of the scan does not cover the keyspace
    with r.pipeline(transaction=False) as p:
        for i in range(5000):
            p.set(f"{keys.prefix}:filler:{i}", 1)
        p.execute()
    for i in range(20):
        push(r, keys, f"gone{i}", f"t{i}")
    found: set[str] = set()
    for _ in range(100):
        found |= set(strays.candidates(1000))
        if not r.exists(keys.strays_cursor):
            break
    assert found == {f"gone{i}" for i in range(20)}
    assert not r.exists(keys.strays_cursor)  # a round done


def test_a_sweep_keeps_watching_a_gone_model_while_an_unacked_message_names_its_queue(r, keys, strays, state):
    state.register_model("m", INFO)
    state.unregister_model("m")
    seconds, _ = r.time()
    r.zadd(keys.gone, {"m": seconds - 60})
    r.hset(keys.unacked, "tag1", json.dumps([json.loads(envelope(keys, "t1", "m")), "", keys.model_queue("m")]))
    sweeper(strays, Backend(), grace=10, token="a").sweep()
    assert r.zscore(keys.gone, "m") is not None
    # restored, as kombu does: answered after the grace, and then no longer watched
    r.hdel(keys.unacked, "tag1")
    push(r, keys, "m", "t1")
    r.delete(keys.strays_lock)
    backend = Backend()
    sweeper(strays, backend, grace=0, token="b").sweep()
    assert [t for t, _, _ in backend.failed] == ["t1"]
    r.delete(keys.strays_lock)
    sweeper(strays, backend, grace=0, token="c").sweep()
    assert not r.exists(keys.gone, keys.strays, keys.strays_held)


def test_vmodel_requests_of_a_gone_model_go_to_the_vmodels_active_the_rest_are_answered(client, r):
    """A request taken in by a worker loading a model that a cutover auto-deleted meanwhile is
    handed back to the gone model's queue; one that came through a vmodel belongs to that
    vmodel's active model (the soak failed one such request with "was unregistered")."""
    from mesh.control.vmodels import VModelManager

    keys = client.keys
    client.register_model("new", INFO)
    client.set_vmodel("v", "new")
    through_vmodel = json.loads(envelope(keys, "tv", "gone"))
    through_vmodel["headers"]["mm-vmodel-id"] = "v"
    r.lpush(keys.queue_list_key(keys.model_queue("gone"), 5), json.dumps(through_vmodel))
    push(r, keys, "gone", "direct")
    backend = Backend()
    sweep = StraySweeper(StrayStore(r, keys, STEPS), lambda: backend, token="me", interval_s=60, grace_s=0.0,
                         scan_keys=10_000, reroute=lambda m: VModelManager(client.app, client.store).reroute_to_active(m, STEPS))  # fmt: skip
    assert sweep.sweep() == 1
    assert [t for t, _, _ in backend.failed] == ["direct"]
    moved = [json.loads(m) for m in r.lrange(keys.queue_list_key(keys.model_queue("new"), 5), 0, -1)]
    assert [m["headers"]["id"] for m in moved] == ["tv"]
    assert moved[0]["properties"]["delivery_info"]["routing_key"] == keys.model_queue("new")
