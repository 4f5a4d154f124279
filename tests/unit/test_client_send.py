"""MeshClient's send path on a real Redis without workers: what is refused before anything is
enqueued, and what a send leaves behind."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from mesh import MeshClient, ModelInfo
from mesh.errors import ModelNotFound, RequestTooLarge
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
