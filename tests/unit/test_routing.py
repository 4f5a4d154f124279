"""mesh/control/routing.py's producer-side caches, against a real Redis."""

from __future__ import annotations

import itertools
import time

from cachetools import TTLCache

from mesh import ModelInfo
from mesh.control.routing import CONFIG_TTL_S, SETTLED_COPY_S
from mesh.models import CopyInfo, CopyState, WorkerState


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


def test_only_a_settled_copy_is_remembered_as_serving(client, tmp_path):
    """A copy loaded a moment ago may be evicted the next moment (churn): requests remembered
    as served by it would go to a queue nobody consumes. Such a model is routed every time."""
    client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
    store, now = client.store, time.time()
    store.write_heartbeat(WorkerState(name="w1", host="h", pid=1, capacity_bytes=10**9, used_bytes=0,
                                      started_at=now, updated_at=now), ttl_s=30)  # fmt: skip
    store.mark_copy("m", "w1", CopyState.LOADED)
    client.router.prepare("m")
    assert "m" not in client.router._serving
    settled = CopyInfo(worker="w1", state=CopyState.LOADED, since=now - 2 * SETTLED_COPY_S)
    store.r.hset(store.keys.copies("m"), "w1", settled.model_dump_json())
    client.router.prepare("m")
    assert "m" in client.router._serving
