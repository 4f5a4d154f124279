"""The scheduler's cluster store against a real Redis (no workers): its reads, its guarded writes,
its leader lock and history; and the StateStore reads that routing and `mesh status` use."""

from __future__ import annotations

import time

import pytest
import redis

from mesh.models import CopyInfo, CopyState, ModelInfo, WorkerState
from mesh.policy.planner import PastAction
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.cluster import ClusterStore
from mesh.store.state import StateStore

INFO = ModelInfo(runtime="sklearn", uri="file:///models/a.joblib")


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix))
    client.close()


@pytest.fixture
def cluster(store):
    return ClusterStore(store, [0, 5], usage_decay_s=600.0)


def heartbeat(store, name):
    now = time.time()
    store.write_heartbeat(
        WorkerState(name=name, host="h", pid=1, capacity_bytes=1000, used_bytes=0, started_at=now, updated_at=now),
        ttl_s=30,
    )


def test_the_leader_lock_is_held_once_and_released_only_by_its_holder(cluster):
    assert cluster.take_lock("a", 10_000)
    assert not cluster.take_lock("b", 10_000)
    cluster.release_lock("b")
    assert not cluster.take_lock("b", 10_000)
    cluster.release_lock("a")
    assert cluster.take_lock("b", 10_000)


def test_history_is_read_back_and_trimmed(cluster):
    now = time.time()
    old = PastAction(time=now - 100, op="load", model_id="m", worker="w1", reason="min-copies")
    new = PastAction(time=now, op="unload", model_id="m", worker="w2", reason="idle")
    cluster.record_history([old], now - 100, keep_s=1000)
    cluster.record_history([new], now, keep_s=50)
    assert cluster.history(now - 1000) == [new]


def test_mark_loading_writes_once_and_never_for_an_unregistered_model(store, cluster):
    now = time.time()
    assert not cluster.mark_loading("m", "w1", now)
    store.register_model("m", INFO)
    assert cluster.mark_loading("m", "w1", now)
    assert not cluster.mark_loading("m", "w1", now)  # a copy record exists
    copy = CopyInfo.model_validate_json(store.r.hget(store.keys.copies("m"), "w1"))
    assert copy.state is CopyState.LOADING
    assert store.r.zscore(store.keys.load_line("w1"), "m") == pytest.approx(now)


def test_copy_records_are_dropped_only_as_seen_and_only_for_dead_workers_when_asked(store, cluster):
    store.register_model("m", INFO)
    store.mark_copy("m", "w1", CopyState.LOADED)
    heartbeat(store, "w1")
    raw = store.r.hget(store.keys.copies("m"), "w1").decode()
    cluster.drop_copy("m", "w1", raw, only_if_dead=True)
    assert store.r.hexists(store.keys.copies("m"), "w1")
    cluster.drop_copy("m", "w1", raw + " ", only_if_dead=False)
    assert store.r.hexists(store.keys.copies("m"), "w1")
    cluster.drop_copy("m", "w1", raw, only_if_dead=False)
    assert not store.r.hexists(store.keys.copies("m"), "w1")


def test_read_gives_the_planner_workers_models_and_queue_depths(store, cluster):
    store.register_model("m", INFO)
    heartbeat(store, "w1")
    store.r.sadd(store.keys.workers, "gone")
    store.mark_copy("m", "w1", CopyState.LOADED)
    store.r.rpush(store.keys.queue_list_keys(store.keys.model_queue("m"), [0, 5])[1], "x")
    state = cluster.read(time.time(), history_s=60, interval_s=5)
    assert {(w.name, w.alive) for w in state.workers} == {("w1", True), ("gone", False)}
    (model,) = state.models
    assert model.model_id == "m" and model.queue_depth == 1 and set(model.copies) == {"w1"}


def test_a_lock_is_released_only_by_its_holder(store):
    key = store.keys.rebalance_lock
    store.r.set(key, "mine")
    assert not store.release_lock(key, "theirs") and store.r.get(key) == b"mine"
    assert store.release_lock(key, "mine") and store.r.get(key) is None
    assert store.last_rebalance() is None
