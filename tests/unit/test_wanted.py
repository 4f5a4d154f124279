"""The wanted list (a restricted producer's cold path, workers/wanted.py) against a real Redis:
each id goes to one waiting thread, in order, invalid ids and a failing placement are dropped
without stopping the thread, and the list stays bounded."""

from __future__ import annotations

import threading

import pytest
import redis

from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store import state
from mesh.store.state import StateStore
from mesh.tools.launcher import wait_for
from workers.wanted import WantedLoads


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix))
    client.close()


def test_each_wanted_model_reaches_one_thread_and_bad_ones_are_dropped(store):
    got: list[tuple[str, str]] = []
    lock = threading.Lock()

    def handler(name):
        def on_wanted(model_id):
            if model_id == "boom":
                raise RuntimeError("placement failed")
            with lock:
                got.append((name, model_id))
        return on_wanted

    threads = [WantedLoads(store, handler(n)) for n in ("a", "b")]
    for t in threads:
        t.start()
    try:
        for model_id in ("m1", "bad\x00id!", "boom", "m2", "m3"):
            store.want_load(model_id)
        wait_for(lambda: len(got) == 3, 10, what="three wanted loads")
        assert sorted(m for _, m in got) == ["m1", "m2", "m3"]  # once each; the others dropped
        store.want_load("m4")  # the threads survived the failure and the invalid id
        wait_for(lambda: len(got) == 4, 10, what="one more")
    finally:
        for t in threads:
            t.stop()
        for t in threads:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_the_list_is_bounded(store, monkeypatch):
    monkeypatch.setattr(state, "WANTED_MAX", 5)
    for i in range(12):
        store.want_load(f"m{i}")
    assert store.r.llen(store.keys.wanted) == 5
    assert store.pop_wanted(1) == "m7"  # the oldest kept: a flood drops the oldest hints


def test_a_wanted_key_of_the_wrong_type_is_replaced_by_a_producer_and_deleted_by_a_worker(store, caplog):
    """Any producer may write the wanted list. A string in its place failed every restricted
    producer's cold request (WRONGTYPE) and every worker's wait on it, until an operator
    deleted it."""
    r = store.r
    r.set(store.keys.wanted, "not a list")
    store.want_load("m1")  # the producer's push replaces it
    assert r.lrange(store.keys.wanted, 0, -1) == [b"m1"]
    got: list[str] = []
    thread = WantedLoads(store, got.append)
    r.delete(store.keys.wanted)
    r.hset(store.keys.wanted, "a", "hash")
    thread.start()
    try:
        wait_for(lambda: r.type(store.keys.wanted) == b"none", 10, what="the wrong key deleted by the worker")
        store.want_load("m2")
        wait_for(lambda: got == ["m2"], 10, what="the next wanted load")
    finally:
        thread.stop()
        thread.join(timeout=10)
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("replaced" in m and "held a string" in m for m in messages)
    assert any("deleted" in m and "held a hash" in m for m in messages)
