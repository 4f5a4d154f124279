"""The pull batching policy and the buffer container (no Celery, no Redis)."""

from __future__ import annotations

import threading

import pytest

from workers.batcher import Batcher, BatchPolicy, BufferView, select_ready


def view(model, count, oldest, max_bs=4, delay=0.01, failed=False):
    return BufferView(model, count, oldest, max_bs, delay, failed)


def test_nothing_buffered_means_no_choice_and_no_deadline():
    assert select_ready([view("a", 0, 0.0)], now=1.0, quiet=set()) == (None, None)


def test_full_buffer_is_ready_and_capped_at_max_batch_size():
    choice, _ = select_ready([view("a", 9, 1.0, max_bs=4)], now=1.0, quiet=set())
    assert (choice.model_id, choice.size, choice.reason) == ("a", 4, "full")


def test_delay_counts_from_the_oldest_request():
    choice, wait = select_ready([view("a", 2, 1.0, delay=0.01)], now=1.005, quiet=set())
    assert choice is None and wait == pytest.approx(0.005)
    choice, _ = select_ready([view("a", 2, 1.0, delay=0.01)], now=1.010, quiet=set())
    assert (choice.size, choice.reason) == (2, "delay")


def test_quiet_queue_dispatches_without_waiting():
    choice, _ = select_ready([view("a", 1, 1.0, delay=10)], now=1.0, quiet={"a"})
    assert (choice.model_id, choice.reason) == ("a", "idle")


def test_oldest_ready_buffer_goes_first_so_a_flood_does_not_starve_others():
    views = [view("flood", 100, 2.0, max_bs=8), view("rare", 1, 1.0, delay=0.0)]
    choice, _ = select_ready(views, now=2.0, quiet=set())
    assert choice.model_id == "rare"


def test_failed_buffers_are_always_ready():
    choice, _ = select_ready([view("x", 3, 5.0, delay=100, failed=True)], now=5.0, quiet=set())
    assert (choice.reason, choice.size) == ("failed", 3)


def test_wait_is_the_nearest_deadline():
    views = [view("a", 1, 1.0, delay=0.05), view("b", 1, 1.0, delay=0.02)]
    choice, wait = select_ready(views, now=1.0, quiet=set())
    assert choice is None and wait == pytest.approx(0.02)


def test_take_probes_queue_depth_and_dispatches_an_idle_model_at_once():
    probes = []

    def depths(models):
        probes.append(list(models))
        return {m: 0 for m in models}

    b = Batcher(depths)
    b.open("m", BatchPolicy(max_batch_size=8, max_batch_delay_s=60.0))
    assert b.add("m", "req1")
    batch = b.take(timeout=5)
    assert batch.model_id == "m" and batch.reason == "idle" and [p.req for p in batch.items] == ["req1"]
    assert probes == [["m"]]


def test_take_waits_for_the_delay_while_more_is_arriving():
    b = Batcher(lambda models: {m: 5 for m in models})  # the queue always has more
    b.open("m", BatchPolicy(max_batch_size=8, max_batch_delay_s=0.05))
    b.add("m", "r1")
    batch = b.take(timeout=5)
    assert batch.reason == "delay"


def test_take_returns_a_full_batch_as_soon_as_it_fills():
    b = Batcher(lambda models: {m: 100 for m in models})
    b.open("m", BatchPolicy(max_batch_size=3, max_batch_delay_s=60.0))
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(timeout=30)))
    t.start()
    for i in range(3):
        b.add("m", i)
    t.join(30)
    assert got and got[0].reason == "full" and len(got[0].items) == 3


def test_closed_and_sealed_buffers_refuse_requests():
    b = Batcher(lambda models: {})
    assert not b.add("m", "r")  # never opened
    b.open("m", BatchPolicy(4, 1.0))
    b.add("m", "r1")
    b.seal("m")
    assert not b.add("m", "r2")
    assert [p.req for p in b.close("m")] == ["r1"]
    assert not b.is_open("m")


def test_fail_mode_answers_everything_with_the_error():
    b = Batcher(lambda models: {})
    b.open("m", BatchPolicy(4, 60.0))
    b.add("m", "r1")
    err = RuntimeError("load failed")
    b.fail("m", err, BatchPolicy(4, 60.0))
    b.add("m", "r2")
    batch = b.take(timeout=5)
    assert batch.error is err and [p.req for p in batch.items] == ["r1", "r2"]
    assert "m" in b.failed_models()


def test_wait_empty_returns_once_the_buffer_is_taken():
    b = Batcher(lambda models: {m: 0 for m in models})
    b.open("m", BatchPolicy(4, 60.0))
    b.add("m", "r")
    assert not b.wait_empty("m", 0.01)
    b.take(timeout=5)
    assert b.wait_empty("m", 0.01)


def test_stop_wakes_take():
    b = Batcher(lambda models: {})
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(timeout=30)))
    t.start()
    b.stop()
    t.join(10)
    assert got == [None]


def test_a_held_buffer_takes_requests_in_and_batches_them_once_opened():
    """A model's queue is consumed from the start of its load: its requests wait here, none
    batched (nothing could answer them yet), and go as soon as the model is installed."""
    probes = []
    b = Batcher(lambda models: probes.append(list(models)) or {m: 0 for m in models})
    b.hold("m", BatchPolicy(4, 60.0))
    assert b.add("m", "r1") and b.add("m", "r2")
    assert b.take(timeout=0.05) is None
    assert probes == []  # a held buffer is not even asked about
    assert b.is_open("m") and b.buffered() == {"m": 2}
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(timeout=30)))
    t.start()
    b.open("m", BatchPolicy(8, 60.0))  # wakes the waiting take
    t.join(30)
    assert got and [p.req for p in got[0].items] == ["r1", "r2"]


def test_a_held_buffer_only_takes_the_policy_and_never_overrides_a_serving_or_failed_one():
    b = Batcher(lambda models: {})
    b.hold("m", BatchPolicy(4, 60.0))
    b.hold("m", BatchPolicy(16, 60.0))
    assert b.policies() == {"m": BatchPolicy(16, 60.0)}  # the record's, once read
    b.open("s", BatchPolicy(4, 60.0))
    b.hold("s", BatchPolicy(1, 0.0))
    assert b.policies()["s"] == BatchPolicy(4, 60.0) and b.release_held("s") is None
    err = RuntimeError("unregistered")
    b.fail("m", err, BatchPolicy(4, 60.0))  # a failure answers what it held
    b.add("m", "r")
    assert b.release_held("m") is None
    assert b.take(timeout=5).error is err


def test_a_load_that_did_not_happen_gives_back_what_its_held_buffer_took_in():
    b = Batcher(lambda models: {})
    b.hold("m", BatchPolicy(4, 60.0))
    b.add("m", "r1")
    b.add("m", "r2", high=True)
    assert [p.req for p in b.release_held("m")] == ["r2", "r1"]
    assert not b.is_open("m") and not b.add("m", "r3")
