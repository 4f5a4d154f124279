"""mesh.broker.pipeline: the results path's packed pipeline against redis-py's, on a real Redis."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.pipeline import PackedPipeline


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _batch(pipe, p: str) -> None:
    """A lone request's results and acks, as the results path queues them."""
    pipe.set(f"{p}.meta", b'{"status": "SUCCESS", "r": "\xc3\xa9"}', ex=600)
    pipe.set(f"{p}.plain", "v")
    pipe.publish(f"{p}.meta", b"record")
    pipe.zrem(f"{p}.index", "tag-1", "tag-2")
    pipe.hdel(f"{p}.unacked", "tag-1")
    pipe.srem(f"{p}.held", "tag-1")
    pipe.rpush(f"{p}.reply", b"record", "second")
    pipe.expire(f"{p}.reply", 600)


def _state(r, p: str) -> dict:
    return {
        "meta": r.get(f"{p}.meta"), "plain": r.get(f"{p}.plain"), "meta_ttl": 0 < r.ttl(f"{p}.meta") <= 600,
        "index": r.zrange(f"{p}.index", 0, -1), "unacked": r.hgetall(f"{p}.unacked"),
        "held": r.smembers(f"{p}.held"), "reply": r.lrange(f"{p}.reply", 0, -1),
        "reply_ttl": 0 < r.ttl(f"{p}.reply") <= 600,
    }  # fmt: skip


def _seed(r, p: str) -> None:
    r.zadd(f"{p}.index", {"tag-1": 1, "tag-2": 2, "tag-3": 3})
    r.hset(f"{p}.unacked", mapping={"tag-1": "m1", "tag-3": "m3"})
    r.sadd(f"{p}.held", "tag-1", "tag-3")


def test_the_same_writes_and_replies_as_redis_pys_pipeline(r, prefix):
    ours, theirs = f"{prefix}.ours", f"{prefix}.theirs"
    _seed(r, ours)
    _seed(r, theirs)
    with PackedPipeline(r) as pipe:
        _batch(pipe, ours)
        assert len(pipe) == 8
        replies = pipe.execute()
    with r.pipeline(transaction=False) as p:
        _batch(p, theirs)
        expected = p.execute(raise_on_error=False)
    assert _state(r, ours) == _state(r, theirs)
    assert replies == [b"OK", b"OK", 0, 2, 1, 1, 2, 1]  # raw, as Redis sends them
    assert expected == [True, True, 0, 2, 1, 1, 2, True]


def test_a_refused_command_is_its_error_in_its_place_and_the_others_run(r, prefix):
    r.set(f"{prefix}.reply", "a string squatting the reply list")
    with PackedPipeline(r) as pipe:
        pipe.set(f"{prefix}.meta", b"record")
        pipe.rpush(f"{prefix}.reply", b"record")
        pipe.publish(f"{prefix}.meta", b"record")
        replies = pipe.execute()
    assert replies[0] == b"OK" and replies[2] == 0
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    assert r.get(f"{prefix}.meta") == b"record"
    # the connection is in step: the next pipeline reads its own replies
    with PackedPipeline(r) as pipe:
        pipe.set(f"{prefix}.next", "1")
        assert pipe.execute() == [b"OK"]


def _killing_itself(pipe, prefix: str, client_id: int) -> None:
    pipe.set(f"{prefix}.a", "1")
    pipe._add("CLIENT", "KILL", "ID", client_id, "SKIPME", "no")  # Redis closes it after this reply
    pipe.set(f"{prefix}.b", "2")  # its reply never comes on that connection


def test_a_connection_lost_mid_reply_is_retried_on_a_fresh_one(prefix, redis_url):
    """As redis-py retries a pipeline (the result backend's policy: finding 3 of
    docs/reliability.md): the whole batch again, on a new connection."""
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 2))
    try:
        own_id = client.client_id()  # the pool's one connection; the retry's has another id
        with PackedPipeline(client) as pipe:
            _killing_itself(pipe, prefix, own_id)
            assert pipe.execute() == [b"OK", 0, b"OK"]  # the second run killed no one
        assert client.get(f"{prefix}.b") == b"2"
        assert client.connection_pool._in_use_connections == set()
    finally:
        client.close()


def test_a_connection_lost_past_the_retries_raises_and_is_not_reused(prefix, redis_url):
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    try:
        own_id = client.client_id()
        (conn,) = client.connection_pool._available_connections
        with PackedPipeline(client) as pipe:
            _killing_itself(pipe, prefix, own_id)
            with pytest.raises(redis.ConnectionError):
                pipe.execute()
        assert conn._sock is None  # dropped, not put back out of step
        assert client.connection_pool._in_use_connections == set()
        with PackedPipeline(client) as pipe:
            pipe.set(f"{prefix}.c", "3")
            assert pipe.execute() == [b"OK"]
        assert client.get(f"{prefix}.a") == b"1" and client.get(f"{prefix}.b") is None
    finally:
        client.close()


def test_nothing_queued_needs_no_connection(r):
    pool = r.connection_pool
    before = len(pool._available_connections) + len(pool._in_use_connections)
    assert PackedPipeline(r).execute() == []
    assert len(pool._available_connections) + len(pool._in_use_connections) == before
