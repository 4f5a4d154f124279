"""mesh/control/routing.py's producer-side caches, against a real Redis."""

from __future__ import annotations

import itertools
import time

from cachetools import TTLCache

from mesh import ModelInfo
from mesh.control.routing import CONFIG_TTL_S, YOUNG_COPY_FRACTION
from mesh.models import CopyInfo, CopyState, WorkerState
from mesh.protocol.messages import SERVING_TTL_S


def test_a_config_expiring_during_the_lookup_is_read_again_not_a_key_error(client, tmp_path):
    client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
    # a clock that moves 0.6 TTL on every reading: entries keep expiring between two looks
    # at them (what a busy producer thread hits by chance; the soak did once in 172,000)
    ticks = itertools.count(step=CONFIG_TTL_S * 0.6)
    client.router._configs = TTLCache(maxsize=100, ttl=CONFIG_TTL_S, timer=lambda: next(ticks))
    for _ in range(20):
        cfg = client.router.model_config("m")
        assert cfg is not None and cfg.value("max_batch_size") >= 1
    assert client.router.model_config("absent") is None


def test_a_copy_is_remembered_as_serving_for_a_part_of_its_age(client, tmp_path):
    """A copy loaded a moment ago may be evicted the next moment (churn): requests remembered
    as served by it would go to a queue nobody consumes. It is remembered for a quarter of the
    time it has been loaded (the route script asked again after that), up to SERVING_TTL_S."""
    client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
    store, router = client.store, client.router
    now = time.time()
    store.write_heartbeat(WorkerState(name="w1", host="h", pid=1, capacity_bytes=10**9, used_bytes=0,
                                      started_at=now, updated_at=now), ttl_s=30)  # fmt: skip
    store.mark_copy("m", "w1", CopyState.LOADING)
    router.prepare("m")
    assert "m" not in router._serving  # loading: routed every time
    for age, memory in ((0.4, 0.4 * YOUNG_COPY_FRACTION), (60.0, SERVING_TTL_S)):
        copy = CopyInfo(worker="w1", state=CopyState.LOADED, since=time.time() - age)
        store.r.hset(store.keys.copies("m"), "w1", copy.model_dump_json())
        router.forget("m")
        before = time.monotonic()
        router.prepare("m")
        expires = router._serving["m"]
        assert before + memory * 0.9 <= expires <= time.monotonic() + memory + 0.05


def test_a_producer_routes_a_young_copy_a_few_dozen_times_not_every_request(client, tmp_path, monkeypatch):
    """The first seconds after a load: requests used to pay the route script each until the
    copy had been LOADED for 2 s (closedloop svc1: 946 route calls in that window)."""
    client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
    store, router = client.store, client.router
    now = time.time()
    store.write_heartbeat(WorkerState(name="w1", host="h", pid=1, capacity_bytes=10**9, used_bytes=0,
                                      started_at=now, updated_at=now), ttl_s=30)  # fmt: skip
    copy = CopyInfo(worker="w1", state=CopyState.LOADED, since=now)
    store.r.hset(store.keys.copies("m"), "w1", copy.model_dump_json())
    clock = [time.monotonic()]  # the producer's clock, moved by hand: 2 s of requests 2 ms apart
    router._clock = lambda: clock[0]
    routes = []
    real = store.route_and_place

    def counted(*args, **kwargs):
        routed = real(*args, **kwargs)
        routes.append(routed.loaded_for)
        return routed

    monkeypatch.setattr(store, "route_and_place", counted)
    start = clock[0]
    for i in range(1000):
        clock[0] = start + i * 0.002
        # the copy's age as the route script reads it, on the same moved clock
        copy = CopyInfo(worker="w1", state=CopyState.LOADED, since=time.time() - (clock[0] - start) - 0.001)
        store.r.hset(store.keys.copies("m"), "w1", copy.model_dump_json())
        router.prepare("m")
    assert 5 <= len(routes) <= 60, len(routes)
