"""The heartbeat in the test process against a real Redis: what it writes, with which TTL,
how it turns counters into rates, and that its duties run after every beat (between beats
too) and that one failing duty never stops the thread."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import redis

from mesh.models import LoadedModel
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.state import StateStore
from mesh.tools.launcher import wait_for
from workers import heartbeat
from workers.heartbeat import Heartbeat, WorkerIdentity
from workers.inference import Stats
from workers.metrics import WorkerMetrics

NAME = "w1@unit"


class Models:
    """The model manager, as far as the heartbeat asks it."""

    def __init__(self) -> None:
        self.loaded = [LoadedModel(model_id="a", size_bytes=300, last_used=1.0, loaded_at=1.0)]

    def snapshot(self):
        return [m.model_copy() for m in self.loaded], ["b"], 700


@pytest.fixture
def store(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    yield StateStore(client, Keys(prefix), MeshSettings(prefix=prefix))
    client.close()


@pytest.fixture
def metrics():
    m = WorkerMetrics(NAME, 0)
    yield m
    m.close()


def make(store, metrics, stats=None, **kw) -> Heartbeat:
    defaults = dict(
        shutting_down=lambda: False, interval_s=0.2, ttl_s=0.5,
    )  # fmt: skip
    defaults.update(kw)
    return Heartbeat(store, WorkerIdentity(NAME, "host-a", 4242, 1000.0, 5000), Models(),
                     stats or Stats(), metrics, **defaults)  # fmt: skip


def test_a_beat_writes_the_workers_state_with_a_ttl(store, metrics):
    hb = make(store, metrics, shutting_down=lambda: True)
    hb.beat()
    (w,) = store.live_workers()
    assert (w.name, w.host, w.pid, w.capacity_bytes, w.used_bytes) == (NAME, "host-a", 4242, 5000, 700)
    assert [m.model_id for m in w.models] == ["a"] and w.loading == ["b"] and w.shutting_down
    # the TTL is at least two intervals, so one late beat does not make the worker look dead
    assert 0 < store.r.pttl(store.keys.worker(NAME)) <= 500
    assert metrics.used_bytes._value.get() == 700 and metrics.models_loaded._value.get() == 1


def test_request_rates_come_from_the_counters_between_beats(store, metrics, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(heartbeat, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    stats = Stats()
    hb = make(store, metrics, stats=stats)
    stats.add("a", 10, 0)
    hb.state()
    stats.add("a", 30, 1)
    clock[0] += 10.0
    state = hb.state()
    assert state.requests_total == 40 and state.failures_total == 1 and state.batches_total == 2
    assert state.request_rate == 3.0  # 30 requests in 10 s
    assert state.models[0].requests_total == 40 and state.models[0].request_rate == 3.0


def test_duties_run_after_each_beat_and_between_beats_and_survive_failures(store, metrics):
    calls: list[str] = []
    first = threading.Event()

    def flaky() -> None:
        calls.append("after")
        if not first.is_set():
            first.set()
            raise RuntimeError("Redis away")

    hb = make(store, metrics, interval_s=0.2, after_beat=[flaky, lambda: calls.append("second")],
              between_beats=[lambda: calls.append("between")])  # fmt: skip
    hb.start()
    try:
        wait_for(lambda: calls.count("after") >= 3 and calls.count("between") >= 3, 10,
                 what="three rounds of duties")  # fmt: skip
    finally:
        hb.stop()
        hb.join(timeout=5)
    assert not hb.is_alive()
    assert calls.count("after") >= 3
    # the round whose first duty failed skipped the rest of it; later rounds ran everything
    assert calls.count("second") == calls.count("after") - 1
    assert calls.count("between") >= 3
    assert store.live_workers()[0].name == NAME
