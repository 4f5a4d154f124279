"""MeshClient's send path on a real Redis without workers: what is refused before anything is
enqueued, and what a send leaves behind."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from mesh import MeshClient, ModelInfo
from mesh.errors import InvalidArgument, ModelNotFound, RequestTooLarge
from mesh.settings import MeshSettings


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
            handle, prepared = c._prepare(model, None, {"inputs": []}, None, kw.get("timeout_ms"),
                                          kw.get("max_timeout_ms"))  # fmt: skip
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
