"""mesh/control/routing.py's producer-side caches, against a real Redis."""

from __future__ import annotations

import itertools

from cachetools import TTLCache

from mesh import ModelInfo
from mesh.control.routing import CONFIG_TTL_S


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
