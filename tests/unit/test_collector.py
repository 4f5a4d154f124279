"""workers/collector.py: a worker runs a full garbage collection when there is something for one
to free (failures in the last 15 s, an evicted model still alive, resident memory that grew, or
a long time since the last), not on a clock; an evicted model that a collection does not free
is named. The model manager tells the collector of every model it drops (a rig of the real
manager against a real Redis)."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest

from mesh.models import ModelInfo
from tests.unit.worker_rig import MB, Rig
from workers.collector import (
    ERRORS,
    ERRORS_EVERY_S,
    EVICTED_ALIVE,
    EVICTED_GRACE_S,
    FULL_EVERY_S,
    GREW,
    GROWTH_MIN_BYTES,
    INTERVAL,
    LEAK_S,
    Collector,
    collection_due,
)
from workers.memory import resident_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Model:
    """A stand-in for a loaded model (weak references allowed, as for any Python class)."""


@pytest.fixture
def no_automatic_gc():
    # the test decides when collections run: an automatic one would free the cycles early
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


MiB = 1024**2


def _collector(
    clock: Clock, resident: list[int | None] | None = None, failures: list[int] | None = None
) -> tuple[Collector, list[int]]:
    collections: list[int] = []
    memory = resident if resident is not None else [200 * MiB]
    failed = failures if failures is not None else [0]

    def collect() -> int:
        collections.append(1)
        return gc.collect()

    return Collector(clock=clock, failures=lambda: failed[0], resident=lambda: memory[0],
                     collect=collect), collections  # fmt: skip


def test_the_policy() -> None:
    quiet = {"since_s": 10.0, "failures": 0, "resident": 400 * MiB, "resident_after_last": 400 * MiB,
             "evicted_alive": False}  # fmt: skip
    assert collection_due(**quiet) is None
    assert collection_due(**{**quiet, "evicted_alive": True}) == EVICTED_ALIVE
    assert collection_due(**{**quiet, "since_s": FULL_EVERY_S}) == INTERVAL
    # failures: every ERRORS_EVERY_S while there are any
    assert collection_due(**{**quiet, "failures": 3}) is None
    assert collection_due(**{**quiet, "failures": 3, "since_s": ERRORS_EVERY_S}) == ERRORS
    assert collection_due(**{**quiet, "since_s": ERRORS_EVERY_S}) is None
    # a quarter more, and at least GROWTH_MIN_BYTES
    assert collection_due(**{**quiet, "resident": 500 * MiB - 1}) is None
    assert collection_due(**{**quiet, "resident": 500 * MiB}) == GREW
    small = {**quiet, "resident_after_last": 50 * MiB}
    assert collection_due(**{**small, "resident": 50 * MiB + GROWTH_MIN_BYTES - 1}) is None
    assert collection_due(**{**small, "resident": 50 * MiB + GROWTH_MIN_BYTES}) == GREW
    # memory that cannot be read: every ERRORS_EVERY_S, as before this policy
    blind = {**quiet, "resident": None, "resident_after_last": None}
    assert collection_due(**{**blind, "since_s": ERRORS_EVERY_S - 0.1}) is None
    assert collection_due(**{**blind, "since_s": ERRORS_EVERY_S}) == INTERVAL


def test_failures_bring_a_collection_every_errors_every_s_and_none_after(no_automatic_gc) -> None:
    clock = Clock()
    failed = [0]
    collector, collections = _collector(clock, failures=failed)
    for _ in range(30):  # a minute of heartbeats, requests failing all along
        clock.now += 2.0
        failed[0] += 5
        collector.maybe_collect()
    assert ERRORS_EVERY_S == 15.0 and len(collections) == 3  # at 16, 32 and 48 s
    for _ in range(30):  # a minute without a failure: one more, for those after 48 s
        clock.now += 2.0
        collector.maybe_collect()
    assert len(collections) == 4
    for _ in range(30):
        clock.now += 2.0
        assert collector.maybe_collect() is None


def test_resident_bytes_is_this_process_s() -> None:
    before = resident_bytes()
    assert before is not None and before > 10 * MiB
    block = bytearray(64 * MiB)  # touched: resident
    after = resident_bytes()
    assert after is not None and after - before >= 60 * MiB
    del block


def test_nothing_to_free_means_no_collection(no_automatic_gc) -> None:
    clock = Clock()
    collector, collections = _collector(clock)
    collector.evicted("m", Model())  # dropped at once: freed by reference counting
    for _ in range(10):
        clock.now += 2.0  # heartbeats
        assert collector.maybe_collect() is None
    assert collections == []
    clock.now += FULL_EVERY_S
    assert collector.maybe_collect() == INTERVAL
    assert collections == [1]


def test_an_evicted_model_in_a_reference_cycle_is_collected_after_its_grace(no_automatic_gc) -> None:
    clock = Clock()
    collector, collections = _collector(clock)
    model = Model()
    model.me = model  # a cycle: reference counting cannot free it
    ref = weakref.ref(model)
    collector.evicted("cyclic", model)
    del model
    assert ref() is not None
    clock.now += EVICTED_GRACE_S / 2  # still within its grace: perhaps only in use a moment longer
    assert collector.maybe_collect() is None
    clock.now += EVICTED_GRACE_S
    assert collector.maybe_collect() == EVICTED_ALIVE
    assert ref() is None
    assert collections == [1]
    clock.now += 2.0
    assert collector.maybe_collect() is None  # judged once


def test_an_evicted_model_that_survives_a_collection_is_named_if_it_outlives_leak_s(
    caplog, no_automatic_gc
) -> None:
    clock = Clock()
    collector, collections = _collector(clock)
    kept = Model()  # something still holds it: a snapshot being written, or a leak
    brief = Model()
    collector.evicted("leaky", kept)
    collector.evicted("brief", brief)
    clock.now += EVICTED_GRACE_S
    with caplog.at_level(logging.WARNING, logger="mesh.worker.collector"):
        assert collector.maybe_collect() == EVICTED_ALIVE
        del brief  # let go of later: forgotten, not named
        while clock.now + 2.0 < 1000.0 + EVICTED_GRACE_S + LEAK_S:  # heartbeats: no collection again
            clock.now += 2.0
            assert collector.maybe_collect() is None
        assert not caplog.records  # not before LEAK_S
        clock.now += 2.0
        assert collector.maybe_collect() is None
    named = [r.getMessage() for r in caplog.records]
    assert len(named) == 1 and "leaky" in named[0] and "still referenced" in named[0]
    assert collections == [1]
    assert kept is not None


def test_a_model_that_takes_no_weak_reference_is_collected_for_once(no_automatic_gc) -> None:
    clock = Clock()
    collector, collections = _collector(clock)
    collector.evicted("slots", 12345)  # an int takes no weak reference: cannot tell, so collect
    clock.now += EVICTED_GRACE_S
    assert collector.maybe_collect() == EVICTED_ALIVE
    clock.now += 2.0
    assert collector.maybe_collect() is None
    assert collections == [1]


def test_memory_that_grew_is_collected_and_becomes_the_new_baseline(no_automatic_gc) -> None:
    clock = Clock()
    memory = [400 * MiB]
    collector, collections = _collector(clock, memory)
    memory[0] = 480 * MiB
    clock.now += 2.0
    assert collector.maybe_collect() is None
    memory[0] = 500 * MiB
    assert collector.maybe_collect() == GREW
    memory[0] = 620 * MiB  # a quarter of 500 MB is 125 MB
    clock.now += 2.0
    assert collector.maybe_collect() is None
    assert collections == [1]


def _held(rig: Rig, model_id: str) -> object:
    """The user's instance of a loaded python-runtime model (not its wrapper: the runtime's
    `held`)."""
    entry = rig.manager.acquire(model_id, 0)
    try:
        return entry.loaded.runtime.held(entry.loaded.model)
    finally:
        rig.manager.release(entry)


@pytest.fixture
def rig(redis_url, prefix, tmp_path):
    clock = Clock()
    r = Rig(redis_url, prefix, tmp_path, collector=Collector(clock=clock))
    r.clock = clock
    yield r
    r.close()


def test_the_manager_tells_the_collector_of_each_model_it_drops(rig, no_automatic_gc) -> None:
    """A python-runtime model in a reference cycle, evicted by the real manager: the next
    heartbeat past its grace collects it; one without a cycle was freed at once."""
    rig.register("cyclic", size=2 * MB, cycle=True)
    rig.register("plain", size=2 * MB)
    rig.register("next", size=2 * MB)
    rig.load("cyclic")
    refs = {"cyclic": weakref.ref(_held(rig, "cyclic"))}
    rig.load("plain")  # 2 MB more in 3 MB: cyclic leaves
    rig.events.wait_for(("unloaded", "cyclic", False))
    refs["plain"] = weakref.ref(_held(rig, "plain"))
    rig.load("next")  # plain leaves
    rig.events.wait_for(("unloaded", "plain", False))
    assert refs["plain"]() is None  # no cycle: freed by reference counting
    assert refs["cyclic"]() is not None
    rig.clock.now += EVICTED_GRACE_S
    assert rig.manager.collector.maybe_collect() == EVICTED_ALIVE
    assert refs["cyclic"]() is None


def test_an_evicted_onnx_model_is_watched_by_its_session_and_needs_no_collection(
    redis_url, prefix, tmp_path, onnx_path, no_automatic_gc
) -> None:
    """The onnx runtime's unload clears the session off its wrapper: the manager takes what to
    watch (`Runtime.held`) before it. Watched after, it was None, which takes no weak reference
    and so brought a full collection with every eviction."""
    clock = Clock()
    collections: list[int] = []
    collector = Collector(clock=clock, resident=lambda: 200 * MiB, collect=lambda: collections.append(1))
    rig = Rig(redis_url, prefix, tmp_path, collector=collector)
    try:
        rig.store.register_model("o", ModelInfo(runtime="onnx", uri=f"file://{onnx_path}"))
        rig.load("o")
        session = weakref.ref(_held(rig, "o"))
        rig.manager.request_unload("o")
        rig.events.wait_for(("unloaded", "o", False))
        assert session() is None
        clock.now += EVICTED_GRACE_S
        assert collector.maybe_collect() is None
        assert collections == []
    finally:
        rig.close()
