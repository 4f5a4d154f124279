"""Autoscaling signals (docs/operations.md "Autoscaling signals"): the pure summary
(mesh/policy/signals.py) with its top-N bound, the Prometheus families the exporter serves
(parsed back by prometheus_client's own parser), and the Redis reads (mesh/store/signals.py)
against a real Redis: every queue counted, the oldest send time found, round trips bounded by
chunks rather than by models."""

from __future__ import annotations

import json

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import CollectorRegistry, generate_latest

from mesh.models import LoadedModel, ModelInfo, WorkerState
from mesh.policy.signals import summarize
from mesh.protocol.keys import Keys
from mesh.protocol.messages import PRIORITY_STEPS, SENT_AT_HEADER
from mesh.settings import MeshSettings
from mesh.store.signals import SCAN_CHUNK, SignalReader
from mesh.store.state import StateStore
from mesh.tools.exporter import families
from tests.unit.test_state import round_trips

NOW = 1_000_000.0


def worker(name, models=(), capacity=1000, used=0, shutting_down=False, labels=None):
    return WorkerState(
        name=name, host="h", pid=1, capacity_bytes=capacity, used_bytes=used, started_at=NOW, updated_at=NOW,
        shutting_down=shutting_down, labels=labels or {},
        models=[LoadedModel(model_id=m, size_bytes=10, last_used=NOW, loaded_at=NOW, buffered=b, inflight=i,
                            oldest_buffered_s=age) for m, b, i, age in models],
    )  # fmt: skip


def test_summary_adds_queues_and_worker_buffers_and_takes_the_oldest_age():
    s = summarize(
        queued={"a": 5, "b": 1}, oldest_sent={"a": NOW - 7.5},
        workers=[worker("w1", [("a", 2, 1, 0.4), ("c", 0, 0, 0.0)], used=300),
                 worker("w2", [("b", 3, 0, 9.0)], capacity=500, used=100),
                 worker("w3", shutting_down=True)],
        sizes={"a": 100, "b": 200, "c": 50}, registered=10, now=NOW, top_n=10,
    )  # fmt: skip
    by_id = {m.model_id: m for m in s.models}
    assert (by_id["a"].pending, by_id["a"].queued, by_id["a"].buffered, by_id["a"].copies) == (8, 5, 3, 1)
    assert by_id["a"].oldest_pending_age_s == 7.5  # in its queue, longer than in the worker
    assert by_id["b"].oldest_pending_age_s == 9.0  # buffered in a worker longer than the queue says
    assert "c" not in by_id  # loaded, nothing pending
    assert [m.model_id for m in s.models] == ["a", "b"]  # most pending first
    assert (s.pending, s.queued, s.buffered, s.oldest_pending_age_s) == (12, 6, 6, 9.0)
    assert (s.models_pending, s.models_pending_without_copy, s.models_loaded, s.copies_loaded) == (2, 0, 3, 3)
    assert (s.workers, s.workers_shutting_down, s.capacity_bytes, s.used_bytes) == (3, 1, 1500, 400)
    assert (s.demand_bytes, s.demand_unknown_models, s.models_registered) == (350, 0, 10)


def test_top_n_bounds_the_per_model_series_at_100k_pending_models():
    queued = {f"m{i}": 1 + i % 97 for i in range(100_000)}
    s = summarize(queued=queued, oldest_sent={}, workers=[], sizes={}, registered=100_000, now=NOW, top_n=25)
    assert len(s.models) == 25 and all(m.pending == 97 for m in s.models)
    assert s.pending == sum(queued.values()) and s.models_pending == 100_000
    assert s.models_pending_without_copy == 100_000 and s.demand_unknown_models == 100_000

    text = generate_latest(_registry(families(s, "mesh"))).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    models = {sample.labels["model"] for sample in parsed["mesh_model_pending_requests"].samples}
    assert len(models) == 25
    other = parsed["mesh_cluster_other_pending_requests"].samples[0].value
    assert other == s.pending - 25 * 97
    assert parsed["mesh_cluster_pending_requests"].samples[0].value == s.pending
    # every series of the endpoint: a constant number of aggregates plus 4 per top-N model, and
    # one row per pool in each pool family (here only `default`)
    pool_families = [f for f in families(s, "mesh") if f.name.startswith("mesh_pool_")]
    assert pool_families and all(len(f.samples) == 1 for f in pool_families)
    assert sum(len(f.samples) for f in parsed.values()) == len(families(s, "mesh")) - 4 + 4 * 25


def test_pools_give_demand_against_the_capacity_of_the_workers_carrying_their_labels():
    """A pool is the label set its models require (none: `default`); its workers are the live
    ones carrying those labels, so a worker counts in every pool it serves."""
    s = summarize(
        queued={"a1": 2, "a2": 3, "z": 1, "b": 4},
        oldest_sent={},
        workers=[worker("w1", [("a1", 1, 0, 0.0)], capacity=1000, used=100, labels={"env": "a"}),
                 worker("w2", capacity=2000, used=0, labels={"env": "a", "zone": "z"}),
                 worker("w3", [("d", 0, 0, 0.0)], capacity=500, used=50),
                 worker("w4", capacity=4000, used=0, shutting_down=True, labels={"env": "b"})],
        sizes={"a1": 100, "a2": 200, "z": 300, "b": 400, "d": 50},
        registered=6, now=NOW, top_n=10,
        required={"a1": {"env": "a"}, "a2": {"env": "a"}, "z": {"zone": "z", "env": "a"}, "b": {"env": "b"}},
        top_pools=10,
    )  # fmt: skip
    pools = {p.pool: p for p in s.pools}
    assert list(pools) == ["env=b", "env=a", "env=a,zone=z", "default"]  # most demand, then most pending
    a = pools["env=a"]
    assert (a.required_labels, a.workers, a.capacity_bytes, a.used_bytes) == ({"env": "a"}, 2, 3000, 100)
    assert (a.demand_bytes, a.pending, a.models_pending, a.models_pending_without_copy, a.models_loaded) == (300, 6, 2, 1, 1)
    z = pools["env=a,zone=z"]
    assert (z.workers, z.capacity_bytes, z.demand_bytes, z.pending, z.models_pending_without_copy) == (1, 2000, 300, 1, 1)
    b = pools["env=b"]  # its only worker is leaving: demand, no capacity
    assert (b.workers, b.capacity_bytes, b.used_bytes, b.demand_bytes, b.pending) == (0, 0, 0, 400, 4)
    d = pools["default"]  # every worker serves it
    assert (d.required_labels, d.workers, d.capacity_bytes, d.used_bytes, d.demand_bytes) == ({}, 3, 3500, 150, 50)
    assert (d.pending, d.models_loaded) == (0, 1)
    assert sum(p.demand_bytes for p in s.pools) == s.demand_bytes  # every wanted model in one pool

    text = generate_latest(_registry(families(s, "mesh"))).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    demand = {x.labels["pool"]: x.value for x in parsed["mesh_pool_demand_bytes"].samples}
    assert demand == {"env=b": 400, "env=a,zone=z": 300, "env=a": 300, "default": 50}
    capacity = {x.labels["pool"]: x.value for x in parsed["mesh_pool_capacity_bytes"].samples}
    assert capacity == {"env=b": 0, "env=a,zone=z": 2000, "env=a": 3000, "default": 3500}
    assert parsed["mesh_pool_pending_requests"].samples[0].labels == {"mesh": "mesh", "pool": "env=b"}


def test_top_pools_bounds_the_pool_series_and_sums_the_rest_as_other():
    n = 40  # a pool per model: far more label sets than in practice
    s = summarize(
        queued={f"m{i}": 1 for i in range(n)}, oldest_sent={},
        workers=[worker(f"w{i}", capacity=100, labels={"env": f"e{i}"}) for i in range(n)],
        sizes={f"m{i}": 10 + i for i in range(n)}, registered=n, now=NOW, top_n=5,
        required={f"m{i}": {"env": f"e{i}"} for i in range(n)}, top_pools=3,
    )  # fmt: skip
    assert [p.pool for p in s.pools] == ["env=e39", "env=e38", "env=e37", "other"]
    other = s.pools[-1]
    assert other.required_labels is None
    # the 36 other label pools and `default` (every worker serves it): workers counted once
    assert (other.workers, other.capacity_bytes) == (n, 100 * n)
    assert other.demand_bytes == sum(10 + i for i in range(37)) and other.pending == 37 == other.models_pending
    text = generate_latest(_registry(families(s, "mesh"))).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {x.labels["pool"] for x in parsed["mesh_pool_demand_bytes"].samples} == {"env=e39", "env=e38", "env=e37", "other"}
    assert parsed["mesh_signals_top_pools"].samples[0].value == 3


def test_labels_are_escaped():
    s = summarize(queued={'we"ird\\id\n': 2}, oldest_sent={}, workers=[], sizes={}, registered=1, now=NOW, top_n=5)
    text = generate_latest(_registry(families(s, 'p"x'))).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    sample = parsed["mesh_model_pending_requests"].samples[0]
    assert sample.labels == {"mesh": 'p"x', "model": 'we"ird\\id\n'} and sample.value == 2


def _registry(fams):
    class Fixed:
        def collect(self):
            return fams

    r = CollectorRegistry(auto_describe=False)
    r.register(Fixed())
    return r


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix))
    client.close()


def _envelope(sent_at=None, body_mentions=False):
    headers = {"id": "x"}
    if sent_at is not None:
        headers[SENT_AT_HEADER] = sent_at
    body = json.dumps([[], {"note": f'"{SENT_AT_HEADER}": 1.0' if body_mentions else ""}, {}])
    return json.dumps({"body": body, "headers": headers, "properties": {}})


def test_the_reader_counts_every_queue_and_finds_the_oldest_send_in_chunks(store, monkeypatch):
    keys, r = store.keys, store.r
    n = SCAN_CHUNK + 300  # more queues than one chunk
    with r.pipeline(transaction=False) as p:
        for i in range(n):
            key = keys.queue_list_key(keys.model_queue(f"m{i}"), 5)
            p.lpush(key, _envelope(NOW + i), _envelope(NOW + i + 1))  # tail = oldest = NOW + i
        p.execute()
    urgent = keys.queue_list_key(keys.model_queue("m7"), 0)
    r.lpush(urgent, _envelope(NOW - 50))  # an older one in another priority list of m7
    r.lpush(keys.queue_list_key(keys.model_queue("nohdr"), 5), _envelope(None, body_mentions=True))
    r.lpush(keys.queue_bell(keys.model_queue("m1")), 1)  # a bell is not a queue
    store.register_model("m3", ModelInfo(runtime="sklearn", uri="file:///a.joblib", size_bytes=1234,
                                         required_labels={"env": "a"}))  # fmt: skip

    reader = SignalReader(store, PRIORITY_STEPS)
    reader.read()  # loads the script
    trips = round_trips(monkeypatch)
    got = reader.read()
    assert got.queued["m0"] == 2 and got.queued["m7"] == 3 and got.queued["nohdr"] == 1
    assert len(got.queued) == n + 1 and sum(got.queued.values()) == 2 * n + 2
    assert got.oldest_sent["m5"] == NOW + 5 and got.oldest_sent["m7"] == NOW - 50
    assert "nohdr" not in got.oldest_sent  # the header's text inside the body does not count
    assert got.sizes == {"m3": 1234} and got.registered == 1
    assert got.required == {"m3": {"env": "a"}}
    # bounded by chunks, not by the 1,300 models: SCAN calls, then per chunk a pipeline and a script
    chunks = -(-(n + 1) // SCAN_CHUNK)
    assert trips.count("pipeline") == chunks and trips.count("EVALSHA") == chunks
    assert len(trips) <= 2 * chunks + trips.count("SCAN") + 5, trips


def test_the_reader_finds_each_wanted_models_pool_api_first_then_manifest(store):
    """The labels a wanted model requires come from its record: the management API's, else its
    repository manifest's (mesh/policy/precedence.py); models that require none have no entry."""
    from mesh.models import ModelManifest
    from mesh.store.repository import RepositoryStore

    keys = store.keys

    def info(**kw):
        return ModelInfo(runtime="sklearn", uri="file:///a.joblib", size_bytes=10, **kw)

    store.register_model("api", info(required_labels={"env": "a"}))
    RepositoryStore(store).upsert("manifest", info(), ModelManifest(required_labels={"env": "b"}))
    RepositoryStore(store).upsert("both", info(required_labels={"env": "a"}), ModelManifest(required_labels={"env": "b"}))
    store.register_model("none", info())
    store.register_model("idle", info(required_labels={"env": "c"}))  # not wanted: not read
    for m in ("api", "manifest", "both", "none"):
        store.r.lpush(keys.queue_list_key(keys.model_queue(m), 5), _envelope(NOW))
    got = SignalReader(store, PRIORITY_STEPS).read()
    assert got.required == {"api": {"env": "a"}, "manifest": {"env": "b"}, "both": {"env": "a"}}
    s = summarize(queued=got.queued, oldest_sent=got.oldest_sent, workers=got.workers, sizes=got.sizes,
                  registered=got.registered, now=NOW, top_n=5, required=got.required)  # fmt: skip
    assert {p.pool: p.pending for p in s.pools} == {"env=a": 2, "env=b": 1, "default": 1}
