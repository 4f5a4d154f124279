"""MeshClient's send path on a real Redis without workers: what is refused before anything is
enqueued, and what a send leaves behind."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest
import redis

from mesh import MeshClient, ModelInfo
from mesh.errors import InvalidArgument, ModelNotFound, RequestTooLarge
from mesh.models import Command, CopyState, WorkerState
from mesh.settings import MeshSettings
from tests.unit.test_state import round_trips


@pytest.fixture
def client(redis_url, prefix, tmp_path):
    c = MeshClient(settings=MeshSettings(prefix=prefix, redis_url=redis_url, max_request_bytes=4096))
    c.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
    yield c
    c.close()


def queued(client: MeshClient) -> int:
    rds = redis.Redis.from_url(client.redis_url)
    try:
        queue = client.keys.model_queue("m")
        return sum(rds.llen(k) for k in client.keys.queue_list_keys(queue, [0, 5]))
    finally:
        rds.close()


def test_a_request_over_the_size_limit_is_refused_and_nothing_is_enqueued(client):
    with pytest.raises(RequestTooLarge, match="exceeds MESH_MAX_REQUEST_BYTES=4096"):
        client.infer("m", inputs=np.zeros((1, 1024), dtype=np.float32))
    with pytest.raises(RequestTooLarge):
        client.infer_many("m", inputs=[np.zeros((1, 64), dtype=np.float32)] * 64)
    with pytest.raises(RequestTooLarge):
        asyncio.run(client.infer_async("m", inputs=np.zeros((1, 1024), dtype=np.float32)))
    assert queued(client) == 0
    assert client._replies is None or client._replies.pending() == 0


def test_an_unknown_model_is_refused_before_anything_is_sent(client):
    with pytest.raises(ModelNotFound):
        client.infer("nope", inputs=np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ModelNotFound):
        asyncio.run(client.infer_async("nope", inputs=np.zeros((1, 4), dtype=np.float32)))
    assert queued(client) == 0


def test_a_send_puts_one_message_on_the_queue_and_watches_its_handle(client):
    handle = client.infer("m", inputs=np.zeros((1, 4), dtype=np.float32))
    assert queued(client) == 1
    assert client._replies.pending() == 1 and not handle.ready()


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_cancelled_infer_async_leaves_nothing_in_the_reply_listener(client, how):
    """No worker answers: the caller gives up (its task cancelled, or asyncio.wait_for's
    timeout, the gateway's deadline). Its handle leaves the listener at once, even while
    something still references it, and no longer counts as awaited."""

    async def main() -> None:
        call = asyncio.ensure_future(client.infer_async("m", inputs=np.zeros((1, 4), dtype=np.float32)))
        await asyncio.sleep(0.05)  # sent, and awaited
        listener = client._replies
        held = list(listener._pending.values())  # kept alive: only a discard removes it
        assert len(held) == 1 and listener.awaiting() == 1
        if how == "cancel":
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(call, 0.05)
        assert listener.pending() == 0 and listener.awaiting() == 0
        assert not held[0].ready()

    asyncio.run(main())
    assert queued(client) == 1  # the request itself was sent (its expiry bounds it)


def test_max_timeout_ms_caps_the_models_default_expiry_not_an_explicit_one(redis_url, prefix, tmp_path):
    """What the gateway sends for a request without a deadline of its own: the model's
    `default_timeout_ms` if shorter, else the gateway's default; an explicit timeout_ms wins."""
    import json
    from datetime import datetime

    from mesh.models import BatchingConfig
    from mesh.protocol.messages import SENT_AT_HEADER

    c = MeshClient(settings=MeshSettings(prefix=prefix, redis_url=redis_url))
    try:
        c.register_model("short", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib",
                                            batching=BatchingConfig(default_timeout_ms=2000)))  # fmt: skip
        c.register_model("none", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))

        def expiry_s(model: str, **kw) -> float | None:
            handle, messages, _ = c._prepare(model, None, {"inputs": []}, None, kw.get("timeout_ms"),
                                             kw.get("max_timeout_ms"))  # fmt: skip
            prepared = messages[-1]
            c._replies.discard(handle.id)
            headers = json.loads(prepared.message)["headers"]
            if headers["expires"] is None:
                return None
            return round(datetime.fromisoformat(headers["expires"]).timestamp() - headers[SENT_AT_HEADER], 1)

        assert expiry_s("none") is None
        assert expiry_s("none", max_timeout_ms=60_000) == 60.0
        assert expiry_s("short", max_timeout_ms=60_000) == 2.0
        assert expiry_s("short", max_timeout_ms=500) == 0.5
        assert expiry_s("short", timeout_ms=90_000, max_timeout_ms=500) == 90.0
        with pytest.raises(InvalidArgument, match="max_timeout_ms"):
            c._prepare("none", None, {"inputs": []}, None, None, -1)
    finally:
        c.close()


def live_worker(client: MeshClient, name: str = "w1@h") -> str:
    """A heartbeat as a live worker with room writes it (no process: placement reads only this)."""
    now = time.time()
    client.store.write_heartbeat(WorkerState(name=name, host="h", pid=1, capacity_bytes=10**9, used_bytes=0,
                                             started_at=now, updated_at=now), 30.0)  # fmt: skip
    return name


def commands(client: MeshClient, worker: str) -> list[Command]:
    rds = redis.Redis.from_url(client.redis_url)
    try:
        raw = rds.lrange(client.keys.queue_list_key(client.keys.worker_queue(worker), 0), 0, -1)
    finally:
        rds.close()
    bodies = []
    for m in raw:
        envelope = json.loads(m)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":  # as kombu's Producer sends it
            body = base64.b64decode(body)
        bodies.append(json.loads(body))
    return [Command.model_validate(kwargs) for _, kwargs, _ in bodies]


@pytest.mark.parametrize("how", ["infer", "infer_async"])
def test_a_cold_request_pushes_its_models_load_command_with_itself(client, monkeypatch, how):
    """The request that claims a model's load sends the load command in its own push: three
    round trips (route, the copy recorded, the push), where the command alone cost one more
    and kombu's publish."""
    worker = live_worker(client)
    client.store.route("absent", "c0")  # the route script is loaded: one round trip from now on
    client.router.model_config("m")  # read once per CONFIG_TTL_S, not per request
    trips = round_trips(monkeypatch)
    if how == "infer":
        client.infer("m", inputs=np.zeros((1, 4), dtype=np.float32))
    else:
        async def send() -> None:
            call = asyncio.ensure_future(client.infer_async("m", inputs=np.zeros((1, 4), dtype=np.float32)))
            await asyncio.sleep(0.05)  # pushed, then cancelled: nobody answers here
            call.cancel()

        asyncio.run(send())
    sent = [t for t in trips if t != "BLPOP"]  # not the reply listener's wait, on its own thread
    assert sent == ["EVALSHA", "pipeline", "EVALSHA"], trips
    assert queued(client) == 1
    assert commands(client, worker) == [Command(op="load", model_id="m")]
    assert [(c.worker, c.state) for c in client.store.model_status("m").copies] == [(worker, CopyState.LOADING)]
    # the next request finds the load under way: no second command
    client.infer("m", inputs=np.zeros((1, 4), dtype=np.float32))
    assert queued(client) == 2 and len(commands(client, worker)) == 1


def test_a_cold_request_refused_after_its_load_was_placed_still_sends_the_load(client):
    """Placed means recorded LOADING on a worker: the command must follow even when the request
    itself is then refused, or the model would wait for a load nobody was told about."""
    worker = live_worker(client)
    with pytest.raises(RequestTooLarge):
        client.infer("m", inputs=np.zeros((1, 1024), dtype=np.float32))
    assert queued(client) == 0
    assert commands(client, worker) == [Command(op="load", model_id="m")]


def held_routes(client: MeshClient, monkeypatch) -> tuple[threading.Event, list[bool]]:
    """Every route that reads Redis waits for `release` first (Redis slow to answer); `waited`
    gets, per route, whether it was released (True) or gave up after 5 s."""
    release, waited = threading.Event(), []
    route_and_place = client.store.route_and_place

    def slow(*args, **kwargs):
        waited.append(release.wait(5.0))
        return route_and_place(*args, **kwargs)

    monkeypatch.setattr(client.store, "route_and_place", slow)
    return release, waited


def test_an_async_route_that_reads_redis_leaves_the_loop_free(client, monkeypatch):
    """The route of a request not remembered as served reads Redis (a cold one also places its
    load). It ran on the event loop's thread: while Redis answered, every other request of
    the loop stalled (the gateway's too). Here the loop must run to release the route at all."""
    release, waited = held_routes(client, monkeypatch)

    async def main() -> None:
        call = asyncio.ensure_future(client.infer_async("m", inputs=np.zeros((1, 4), dtype=np.float32)))
        await asyncio.sleep(0.05)  # the route has started, and waits
        release.set()  # only reachable while the route waits if the loop is free
        await asyncio.sleep(0.05)
        call.cancel()  # nobody answers here
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    assert waited == [True]
    assert queued(client) == 1


def test_an_async_route_remembered_runs_inline(client, monkeypatch):
    """A model remembered as served (its config read, its copy loaded a while) needs no Redis
    read to route: no thread hop for the common warm request."""
    client.router.model_config("m")
    client.router._serving["m"] = client.router._clock() + 60.0
    assert client.router.remembers("m", None)
    routes: list[int] = []
    route_and_place = client.store.route_and_place
    monkeypatch.setattr(client.store, "route_and_place", lambda *a, **k: routes.append(1) or route_and_place(*a, **k))

    async def main() -> None:
        loop_thread = threading.get_ident()
        prepare = client._prepare
        threads: list[int] = []
        monkeypatch.setattr(client, "_prepare", lambda *a: threads.append(threading.get_ident()) or prepare(*a))
        call = asyncio.ensure_future(client.infer_async("m", inputs=np.zeros((1, 4), dtype=np.float32)))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert threads == [loop_thread]

    asyncio.run(main())
    assert routes == [] and queued(client) == 1


def test_a_request_cancelled_while_its_route_places_a_load_still_sends_the_load(client, monkeypatch):
    """Cancelled while its route runs (a gateway client gone), the request is not sent, its
    handle is forgotten, and the load its route placed is sent all the same: placed means
    recorded LOADING on a worker, which must be told."""
    worker = live_worker(client)
    release, waited = held_routes(client, monkeypatch)

    async def main() -> None:
        call = asyncio.ensure_future(client.infer_async("m", inputs=np.zeros((1, 4), dtype=np.float32)))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        for _ in range(100):  # the route finishes on its thread, then the loop sends the load
            await asyncio.sleep(0.05)
            if commands(client, worker):
                break

    asyncio.run(main())
    assert waited == [True]
    assert commands(client, worker) == [Command(op="load", model_id="m")]
    assert queued(client) == 0
    assert client._replies.pending() == 0


# ---------------------------------------------------------------- requests through a vmodel


def model_queued(client: MeshClient, model_id: str) -> int:
    return client.store.queue_depth(model_id, [0, 5])


def test_a_request_through_a_vmodel_reads_its_record_once_per_ttl(client, monkeypatch):
    """The vmodel's active model is remembered for VMODEL_TTL_S: the requests after the first
    cost no HGET of the vmodel record (one round trip of a warm request's two)."""
    from mesh.control import routing

    client.set_vmodel("v", "m")
    client.router.model_config("m")  # the model's config: read once per CONFIG_TTL_S, not per request
    trips = round_trips(monkeypatch)
    for _ in range(3):
        client.infer(vmodel_id="v", inputs=np.zeros((1, 4), dtype=np.float32))
    assert trips.count("HGET") == 1, trips
    assert model_queued(client, "m") == 3
    time.sleep(routing.VMODEL_TTL_S + 0.05)
    client.infer(vmodel_id="v", inputs=np.zeros((1, 4), dtype=np.float32))
    assert trips.count("HGET") == 2, trips


def test_the_vmodel_cache_is_shorter_than_the_drain_grace():
    """What makes the cache safe: a producer that read the old active before a switch sends
    while the old model's copies still stay (docs/vmodels.md, "Auto-delete and draining")."""
    from mesh.control.routing import VMODEL_TTL_S
    from mesh.control.vmodels import DRAIN_GRACE_S

    assert 0 < VMODEL_TTL_S < DRAIN_GRACE_S


def test_a_vmodel_switch_is_seen_at_once_by_its_client_and_within_the_ttl_by_others(
    client, redis_url, prefix, tmp_path
):
    from mesh.control import routing

    other = MeshClient(settings=MeshSettings(prefix=prefix, redis_url=redis_url))
    try:
        client.register_model("m2", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib"))
        client.set_vmodel("v", "m")
        x = np.zeros((1, 4), dtype=np.float32)
        client.infer(vmodel_id="v", inputs=x)
        other.infer(vmodel_id="v", inputs=x)
        assert model_queued(client, "m") == 2
        # m has no copy: the switch is immediate
        assert client.set_vmodel("v", "m2").active_model_id == "m2"
        client.infer(vmodel_id="v", inputs=x)  # the client that switched: at once
        assert model_queued(client, "m2") == 1
        time.sleep(routing.VMODEL_TTL_S + 0.05)
        other.infer(vmodel_id="v", inputs=x)  # another producer: once its entry expired
        assert model_queued(client, "m2") == 2
        client.delete_vmodel("v")
        with pytest.raises(ModelNotFound):
            client.infer(vmodel_id="v", inputs=x)
    finally:
        other.close()


def test_a_remembered_active_that_was_auto_deleted_is_read_again(client, redis_url, prefix, tmp_path):
    """Another producer switched the vmodel and its old active went with its last reference:
    the remembered active is NOT_FOUND, and the request goes to the new active (ModelMesh's
    callModel retry), not to the deleted model's queue."""
    other = MeshClient(settings=MeshSettings(prefix=prefix, redis_url=redis_url))
    try:
        info = ModelInfo(runtime="sklearn", uri=f"file://{tmp_path}/m.joblib")
        client.set_vmodel("v", "v1", model_info=info, auto_delete_target_model=True)
        x = np.zeros((1, 4), dtype=np.float32)
        client.infer(vmodel_id="v", inputs=x)  # remembers v -> v1
        other.set_vmodel("v", "v2", model_info=info, auto_delete_target_model=True)
        assert client.get_model_status("v1").state.value == "NOT_FOUND"
        client.infer(vmodel_id="v", inputs=x)
        assert model_queued(client, "v2") == 1
        assert client.router._actives.get("v") is None  # forgotten, read again next time
    finally:
        other.close()
