"""The producer's result path on a real Redis: the reply list and its listener, the handles it
resolves (sync and asyncio), the sweep for records that missed the list, and the result
backend's pushes for requests it answers itself (refused, revoked). No worker process."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time

import pytest
import redis
from celery import states
from celery.app.task import Context
from celery.exceptions import TimeoutError as CeleryTimeoutError

from mesh.app import create_app
from mesh.broker.replies import SWEEP_AFTER_S, MeshResult, ReplyListener
from mesh.errors import ModelNotFound
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.context import redis_client
from mesh.tools.launcher import wait_for


@pytest.fixture
def app(redis_url, prefix):
    a = create_app(MeshSettings(prefix=prefix, redis_url=redis_url), redis_url)
    yield a
    a.close()


@pytest.fixture
def listener(app, redis_url, prefix):
    client = redis_client(redis_url, retry=False)
    backend = app.backend
    lst = ReplyListener(client, Keys(prefix), backend.get_key_for_task, backend.decode)
    yield lst
    lst.close()
    client.close()


@pytest.fixture
def rds(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def answer(app, task_id: str, result, state=states.SUCCESS) -> bytes:
    """A result record as a worker encodes it."""
    backend = app.backend
    value = backend.prepare_exception(result) if state == states.FAILURE else result
    meta = backend._get_result_meta(value, state, None, None)
    meta["task_id"] = task_id
    return backend.encode(meta)


def handle(app, listener, task_id: str) -> MeshResult:
    h = MeshResult(task_id, app=app)
    listener.watch(h)
    return h


def test_a_reply_resolves_its_handle_with_asyncresults_api(app, listener, rds):
    h = handle(app, listener, "t1")
    assert not h.ready() and h.state == states.PENDING
    rds.rpush(listener.key, answer(app, "t1", {"outputs": [1]}))
    assert h.get(timeout=10) == {"outputs": [1]}
    assert h.ready() and h.successful() and h.state == states.SUCCESS and h.result == {"outputs": [1]}
    assert listener.pending() == 0


def test_a_failure_reply_raises_the_typed_error_or_returns_it(app, listener, rds):
    h = handle(app, listener, "t2")
    rds.rpush(listener.key, answer(app, "t2", ModelNotFound("model 'x' not found"), states.FAILURE))
    with pytest.raises(ModelNotFound, match="not found"):
        h.get(timeout=10)
    assert isinstance(h.get(propagate=False), ModelNotFound) and h.failed()


def test_get_times_out_with_celerys_error_when_nothing_comes(app, listener):
    h = handle(app, listener, "t3")
    started = time.monotonic()
    with pytest.raises(CeleryTimeoutError):
        h.get(timeout=0.2)
    assert time.monotonic() - started >= 0.2


def test_a_record_that_missed_the_list_is_found_by_get_and_by_the_sweep(app, listener, rds):
    # stored only (a worker of an older version): get's last look at its timeout finds it
    first = handle(app, listener, "t4")
    rds.set(app.backend.get_key_for_task("t4"), answer(app, "t4", "done"))
    assert first.get(timeout=0.1) == "done"
    # and the listener's sweep resolves a waiter that never calls get with a timeout
    second = handle(app, listener, "t5")
    rds.set(app.backend.get_key_for_task("t5"), answer(app, "t5", "swept"))
    assert second._resolved.wait(SWEEP_AFTER_S * 3)
    assert second.get() == "swept"


def test_one_event_loop_awaits_a_thousand_handles_without_a_thread_each(app, listener, rds):
    ids = [f"a{i}" for i in range(1000)]

    async def main() -> list:
        handles = [handle(app, listener, i) for i in ids]
        threads = threading.active_count()
        waiting = asyncio.gather(*(asyncio.ensure_future(_await(h)) for h in handles))
        await asyncio.sleep(0.05)
        with rds.pipeline(transaction=False) as pipe:
            for i in reversed(ids):
                pipe.rpush(listener.key, answer(app, i, i))
            pipe.execute()
        out = await asyncio.wait_for(waiting, 30)
        assert threading.active_count() == threads
        return out

    assert asyncio.run(main()) == ids


async def _await(h: MeshResult):
    return await h


def test_a_cancelled_await_leaves_the_others_resolved(app, listener, rds):
    async def main() -> str:
        a, b = handle(app, listener, "c1"), handle(app, listener, "c2")
        ta, tb = asyncio.ensure_future(_await(a)), asyncio.ensure_future(_await(b))
        await asyncio.sleep(0.01)
        ta.cancel()
        rds.rpush(listener.key, answer(app, "c1", "one"), answer(app, "c2", "two"))
        assert a.get(timeout=10) == "one"  # the request itself is not cancelled
        return await asyncio.wait_for(tb, 10)

    assert asyncio.run(main()) == "two"


def test_a_cancelled_await_no_longer_keeps_the_listener_popping(app, listener, rds):
    """An await cancelled (a caller's timeout, a client gone) stops counting as awaited: the
    listener's thread goes back to its sweeps instead of popping for a reply nobody awaits.
    The handle itself stays watched: the request was not cancelled."""

    async def main() -> None:
        a, b = handle(app, listener, "u1"), handle(app, listener, "u2")
        ta = asyncio.ensure_future(_await(a))
        tb1, tb2 = asyncio.ensure_future(_await(b)), asyncio.ensure_future(_await(b))
        await asyncio.sleep(0.01)
        assert listener.awaiting() == 2
        ta.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ta
        assert listener.awaiting() == 1
        tb1.cancel()  # b is still awaited by tb2
        await asyncio.sleep(0)
        assert listener.awaiting() == 1
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tb2, 0.05)
        assert listener.awaiting() == 0
        assert listener.pending() == 2  # still watched: a reply resolves them
        rds.rpush(listener.key, answer(app, "u1", "one"))
        assert a.get(timeout=10) == "one"
        assert listener.awaiting() == 0

    asyncio.run(main())


def test_handles_nobody_holds_are_not_kept(app, listener, rds):
    for i in range(100):
        handle(app, listener, f"d{i}")
    gc.collect()
    assert listener.pending() == 0
    rds.rpush(listener.key, answer(app, "d1", "late"))  # a reply for a dropped handle is discarded
    kept = handle(app, listener, "d2")
    rds.rpush(listener.key, answer(app, "d2", "kept"))
    assert kept.get(timeout=10) == "kept"


def test_garbage_on_the_reply_list_does_not_stop_the_listener(app, listener, rds):
    h = handle(app, listener, "g1")
    rds.rpush(listener.key, b"\xff not json", b"[1, 2]", answer(app, "g1", "fine"))
    assert h.get(timeout=10) == "fine"


def test_forget_deletes_the_record(app, listener, rds):
    h = handle(app, listener, "f1")
    rds.set(app.backend.get_key_for_task("f1"), answer(app, "f1", "x"))
    rds.rpush(listener.key, answer(app, "f1", "x"))
    assert h.get(timeout=10) == "x"
    h.forget()
    assert not rds.exists(app.backend.get_key_for_task("f1"))
    assert h.state == states.PENDING


def test_close_ends_the_listener_thread(app, listener):
    handle(app, listener, "z1")
    thread = listener._thread
    assert thread is not None and thread.is_alive()
    listener.close(timeout=5)
    assert not thread.is_alive()


# ---- the result backend answers requests it stores itself to their reply lists


def test_the_backend_pushes_final_states_to_mesh_reply_lists_only(app, rds, prefix):
    keys = Keys(prefix)
    mine = keys.reply_list("e" * 32)
    backend = app.backend
    backend.mark_as_failure("r1", ModelNotFound("gone"), request=Context(id="r1", reply_to=mine))
    backend.mark_as_revoked("r2", "expired", request=Context(id="r2", reply_to=mine))
    backend.store_result("r3", None, states.STARTED, request=Context(id="r3", reply_to=mine))  # not final
    backend.mark_as_failure("r4", ModelNotFound("gone"), request=Context(id="r4", reply_to="a-celery-oid"))
    backend.mark_as_failure("r5", ModelNotFound("gone"), request=Context(id="r5", reply_to=keys.models))
    pushed = [json.loads(v) for v in rds.lrange(mine, 0, -1)]
    assert [(m["task_id"], m["status"]) for m in pushed] == [("r1", "FAILURE"), ("r2", "REVOKED")]
    assert not rds.exists("a-celery-oid") and not rds.exists(keys.models)
    assert backend.get_task_meta("r4")["status"] == states.FAILURE  # stored all the same


def test_many_threads_waiting_share_the_popping_and_all_get_their_own_reply(app, listener, rds):
    ids = [f"s{i}" for i in range(32)]
    handles = {i: handle(app, listener, i) for i in ids}
    got: dict[str, object] = {}
    errors: list[BaseException] = []

    def waiter(task_id: str) -> None:
        try:
            got[task_id] = handles[task_id].get(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for i in reversed(ids):  # one by one: each reply goes to whichever thread pops at the time
        rds.rpush(listener.key, answer(app, i, i))
        assert handles[i]._resolved.wait(10), f"the reply of {i} was not taken"
    for t in threads:
        t.join(30)
    assert not errors and got == {i: i for i in ids}
    assert not listener._followers and not listener._popping.locked()


def test_a_waiter_that_times_out_leaves_the_popping_to_the_others(app, listener, rds):
    slow, fast = handle(app, listener, "slow"), handle(app, listener, "fast")
    out: dict[str, object] = {}

    def wait_fast() -> None:
        out["fast"] = fast.get(timeout=20)

    t = threading.Thread(target=wait_fast)
    t.start()
    with pytest.raises(CeleryTimeoutError):
        slow.get(timeout=0.3)
    rds.rpush(listener.key, answer(app, "fast", "ok"))
    t.join(20)
    assert out == {"fast": "ok"}


def test_threads_and_an_event_loop_wait_on_one_list_together(app, listener, rds):
    sync_ids, async_ids = [f"t{i}" for i in range(8)], [f"l{i}" for i in range(200)]
    sync_handles = [handle(app, listener, i) for i in sync_ids]
    got: list = []
    threads = [threading.Thread(target=lambda h=h: got.append(h.get(timeout=20))) for h in sync_handles]
    for t in threads:
        t.start()

    async def main() -> list:
        handles = [handle(app, listener, i) for i in async_ids]
        waiting = asyncio.gather(*(asyncio.ensure_future(_await(h)) for h in handles))
        await asyncio.sleep(0.05)
        with rds.pipeline(transaction=False) as pipe:
            for i in sync_ids + async_ids:
                pipe.rpush(listener.key, answer(app, i, i))
            pipe.execute()
        return await asyncio.wait_for(waiting, 20)

    assert asyncio.run(main()) == async_ids
    for t in threads:
        t.join(20)
    assert sorted(got) == sorted(sync_ids)
    assert listener._awaited == 0


def test_replies_nobody_waits_for_do_not_pile_up(app, listener, rds):
    kept = [handle(app, listener, f"k{i}") for i in range(3)]  # started, never waited on
    with rds.pipeline(transaction=False) as pipe:
        for i in range(4000):  # many more than one pop takes
            pipe.rpush(listener.key, answer(app, f"gone{i}", i))
        for h in kept:
            pipe.rpush(listener.key, answer(app, h.id, h.id))
        pipe.execute()
    listener._need.set()  # what the next housekeeping round does, without waiting for it
    deadline = time.monotonic() + SWEEP_AFTER_S * 3
    while rds.llen(listener.key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rds.llen(listener.key) == 0
    assert all(h.ready() and h.result == h.id for h in kept)


def test_then_callbacks_run_without_anyone_calling_get(app, listener, rds):
    """Celery's promise API (AsyncResult.then), which callers drive without get()."""
    arrived: list[tuple[str, object]] = []
    done = threading.Event()

    def on_ready(result) -> None:
        arrived.append((result.id, result.result))
        if len(arrived) == 2:
            done.set()

    early = handle(app, listener, "p1")
    rds.rpush(listener.key, answer(app, "p1", "before"))
    assert early.get(timeout=10) == "before"  # here before `then` is called
    late = handle(app, listener, "p2")
    early.then(on_ready)
    late.then(on_ready)
    rds.rpush(listener.key, answer(app, "p2", "after"))
    assert done.wait(SWEEP_AFTER_S / 2), arrived  # well before a housekeeping round
    assert sorted(arrived) == [("p1", "before"), ("p2", "after")]
    assert listener._awaited == 0


def test_a_reply_resolved_while_its_thread_starts_to_follow_still_wakes_it(app, listener):
    """The lost wake-up: `_resolve` finds no thread to wake, and before it marks the handle
    resolved the handle's thread registers to follow and looks. That thread must not sleep
    to its timeout (it did: a closedloop zipf run had one get() answer at its 120 s timeout)."""
    h = handle(app, listener, "r1")
    looked = threading.Event()
    calls = 0

    class Gated(threading.Event):
        """`_resolved`, its set() held until the waiting thread has looked twice (the loop's
        check, then the follower's), as if the resolving thread lost the CPU right there."""

        def is_set(self) -> bool:
            nonlocal calls
            calls += 1
            seen = super().is_set()
            if calls == 2:
                looked.set()
            return seen

        def set(self) -> None:
            looked.wait(10)
            super().set()

    h._resolved = Gated()
    listener._popping.acquire()  # another thread pops: this one follows
    try:
        meta = app.backend.decode(answer(app, "r1", "ok"))
        resolver = threading.Thread(target=h._resolve, args=(meta,))
        resolver.start()
        # `_resolve` found no wake to set and recorded the reply; it now waits in `set()`
        wait_for(lambda: h._reply is not None, 10, interval=0.001, what="the reply recorded")
        out: list[bool] = []
        follower = threading.Thread(target=lambda: out.append(listener.wait(h, 60)), daemon=True)
        follower.start()
        follower.join(15)
        looked.set()  # a waiting thread that never looks at `_resolved` need not hold it up
        assert not follower.is_alive(), "the waiting thread sleeps to its timeout"
        assert out == [True]
        resolver.join(10)
    finally:
        listener._popping.release()


# ---------------------------------------------------------------- the worker's fast records


@pytest.mark.parametrize("result", [
    {"model_name": "m", "id": "t-1", "outputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [8]}]},
    {"model_name": "modèle", "id": "t-1", "results": [
        {"outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.10000000149011612, 1e-30]}]},
        {"error": {"code": "INVALID_ARGUMENT", "type": "InvalidInput", "message": "bad \"quote\" \\ 名前"}},
        {"outputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["ü", "\u2028"]}]},
        {"outputs": [{"name": "i", "shape": [2], "datatype": "UINT64", "data": [2**64 - 1, -(2**63)]}]},
    ]},
])
def test_a_fast_success_record_holds_the_values_celerys_record_holds(app, result):
    """`success_record` writes what Celery's meta and encoder write (the stamp aside), and a
    producer of any kind reads it back the same: AsyncResult through the backend, mesh's reply
    decoder."""
    from mesh.broker.results import success_record
    from mesh.protocol import jsonwire

    backend = app.backend
    request = Context(id="t-1", group=None, parent_id=None)
    fast = success_record(backend, result, "t-1", request, "2026-12-07T15:23:04.951714+00:00")
    assert fast is not None
    slow = backend._get_result_meta(result, states.SUCCESS, None, request)
    slow["task_id"] = "t-1"
    slow["date_done"] = "2026-12-07T15:23:04.951714+00:00"
    assert json.loads(fast) == json.loads(backend.encode(slow))
    assert backend.decode(fast) == backend.decode(backend.encode(slow)) == jsonwire.loads(fast)


@pytest.mark.parametrize("result, request_fields", [
    ({"outputs": [{"data": [float("nan")]}]}, {}),  # orjson would write null
    ({"outputs": [{"data": [2**64]}]}, {}),  # beyond 64 bits
    ({"outputs": [{"data": ["\ud800"]}]}, {}),  # a lone surrogate
    ({"outputs": [{"data": [1]}]}, {"group": "g1"}),  # Celery adds group_id
    ({"outputs": [{"data": [1]}]}, {"parent_id": "p1"}),  # and parent_id
])
def test_a_fast_success_record_gives_way_where_it_would_differ(app, result, request_fields):
    from mesh.broker.results import success_record

    request = Context(**{"id": "t-1", "group": None, "parent_id": None, **request_fields})
    assert success_record(app.backend, result, "t-1", request, "2026-12-07T15:23:04+00:00") is None


def test_no_fast_records_for_a_backend_that_stores_extended_results(redis_url, prefix):
    from mesh.broker.results import success_record

    a = create_app(MeshSettings(prefix=prefix, redis_url=redis_url), redis_url)
    a.conf.result_extended = True
    try:
        request = Context(id="t-1", group=None, parent_id=None)
        assert success_record(a.backend, {"outputs": []}, "t-1", request, "2026-12-07T15:23:04+00:00") is None
    finally:
        a.close()
