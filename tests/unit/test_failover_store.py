"""mesh/store/failover.py and the transport's holder records, on a real Redis (no workers):
each dead holder's messages go back once, whoever puts them back and however many at once;
a live holder's never; acks of every path clear the records."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from mesh.broker.transport import POP_AND_RECORD, ack_in, ack_many, forget_acked, pop_keys_args, redis_server
from mesh.protocol.keys import Keys
from mesh.store.failover import FailoverStore

TRANSPORT = "mesh.broker.transport:Transport"


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _envelope(tag: str, rk: str) -> dict:
    return {"body": "e30=", "headers": {"id": f"id-{tag}", "mm-sent-at": 1765054800.1234567},
            "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": rk}}}  # fmt: skip


def _take(r: redis.Redis, keys: Keys, lists: list[str], holder: str, most: int = 100) -> list[str]:
    k, a = pop_keys_args(keys.kombu_prefix, lists, now=time.time(), most=most, holder=holder, max_deliveries=5)
    out = r.register_script(POP_AND_RECORD)(keys=k, args=a)
    return [t.decode() for t in out[2::3]]


def test_two_live_workers_put_a_dead_holders_messages_back_once(r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = keys.model_queue("m")
    low = keys.queue_list_key(q, 5)
    raws = [json.dumps(_envelope(f"t{i}", q)) for i in range(50)]
    r.lpush(low, *raws)
    assert len(_take(r, keys, [low], "w1@h.aaa")) == 50
    assert r.llen(low) == 0 and r.hlen(keys.unacked) == 50

    a, b = FailoverStore(r, keys), FailoverStore(r, keys)
    assert a.restore_holder("w1@h.aaa") == (-1, [])  # alive: nothing moves
    assert b.beat("w2@h.bbb", 6) == ([], 0)  # alive holders are not reported dead
    r.delete(keys.holder_alive("w1@h.aaa"))  # the process died: its alive key ran out
    assert a.beat("w2@h.bbb", 6) == (["w1@h.aaa"], 0)

    done: list[int] = []
    threads = [threading.Thread(target=lambda s=s: done.append(s.restore_holder("w1@h.aaa").count)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == [0, 50]
    # back as the very bytes that were published (numbers untouched)
    assert sorted(r.lrange(low, 0, -1)) == sorted(x.encode() for x in raws)
    assert r.hlen(keys.unacked) == 0 and r.zcard(keys.unacked_index) == 0 and r.hlen(keys.holder_of) == 0
    assert not r.exists(keys.held("w1@h.aaa")) and not r.sismember(keys.holders, "w1@h.aaa")
    assert {int(v) for v in r.hvals(keys.deliveries)} == {1}  # one failed delivery each
    assert r.llen(keys.queue_bell(q)) == 1  # the queue's bell rang


def test_a_dead_holders_messages_go_back_past_keys_a_producer_squatted(r: redis.Redis, prefix: str) -> None:
    """Any producer may write a model queue's lists and its bell. A string in the place of
    either failed the restore script at that message (WRONGTYPE): the messages before it went
    back, the rest stayed held by the dead worker, and every retry failed the same way."""
    keys = Keys(prefix)
    qa, qb = keys.model_queue("a"), keys.model_queue("b")
    la, lb = keys.queue_list_key(qa, 5), keys.queue_list_key(qb, 5)
    raws = {la: [json.dumps(_envelope(f"a{i}", qa)) for i in range(5)],
            lb: [json.dumps(_envelope(f"b{i}", qb)) for i in range(5)]}  # fmt: skip
    for lst, items in raws.items():
        r.lpush(lst, *items)
    assert len(_take(r, keys, [la, lb], "w1@h.aaa")) == 10
    r.set(la, "not a list")  # squatted once the messages were taken
    r.set(keys.queue_bell(qb), "not a list")
    r.delete(keys.holder_alive("w1@h.aaa"))
    restored = FailoverStore(r, keys).restore_holder("w1@h.aaa")
    assert restored.count == 10 and sorted(restored.queues) == sorted([qa, qb])
    for lst, items in raws.items():
        assert sorted(r.lrange(lst, 0, -1)) == sorted(x.encode() for x in items)
    assert r.llen(keys.queue_bell(qa)) == 1 and r.llen(keys.queue_bell(qb)) == 1
    assert r.hlen(keys.unacked) == 0 and not r.sismember(keys.holders, "w1@h.aaa")


def test_a_restart_under_the_same_name_is_not_its_dead_predecessor(r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = keys.model_queue("m")
    r.lpush(keys.queue_list_key(q, 0), json.dumps(_envelope("old", q)))
    _take(r, keys, [keys.queue_list_key(q, 0)], "w1@h.old")
    r.lpush(keys.queue_list_key(q, 0), json.dumps(_envelope("new", q)))
    _take(r, keys, [keys.queue_list_key(q, 0)], "w1@h.new")  # the restarted process
    r.delete(keys.holder_alive("w1@h.old"))
    store = FailoverStore(r, keys)
    assert store.beat("w2@h.x", 6)[0] == ["w1@h.old"]
    assert store.restore_holder("w1@h.old") == (1, [q])
    assert r.hkeys(keys.unacked) == [b"new"]  # the live process keeps what it holds


def test_a_tag_another_process_holds_now_is_left_to_it(r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = keys.model_queue("m")
    lst = keys.queue_list_key(q, 0)
    r.lpush(lst, json.dumps(_envelope("t", q)))
    _take(r, keys, [lst], "w1@h.a")
    # the visibility sweep put it back (its holder stalled) and another process took it
    r.hdel(keys.unacked, "t")
    r.hdel(keys.holder_of, "t")
    r.lpush(lst, json.dumps(_envelope("t", q)))
    _take(r, keys, [lst], "w2@h.b")
    r.delete(keys.holder_alive("w1@h.a"))
    assert FailoverStore(r, keys).restore_holder("w1@h.a") == (0, [])
    assert r.hget(keys.holder_of, "t").decode().startswith("w2@h.b ")
    assert r.llen(lst) == 0


@pytest.fixture
def conn(redis_url: str, prefix: str) -> Iterator[Connection]:
    c = Connection(redis_url, transport=TRANSPORT, transport_options={
        "global_keyprefix": Keys(prefix).kombu_prefix, "polling_interval": 0.1, "mesh_holder": "w1@h.me",
        "mesh_max_deliveries": 5})  # fmt: skip
    try:
        yield c
    finally:
        c.release()


@pytest.mark.parametrize("how", ["ack", "reject", "ack_many", "ack_in"])
def test_every_ack_path_clears_the_holder_record_and_the_count(
    conn: Connection, r: redis.Redis, prefix: str, how: str
) -> None:
    keys = Keys(prefix)
    queue = Queue(f"{prefix}.q{how}", Exchange(f"{prefix}.q{how}", type="direct"), routing_key=f"{prefix}.q{how}")
    got: list = []
    with conn.channel() as pub, conn.clone() as cc:
        Producer(pub).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                              serializer="json")  # fmt: skip
        channel = cc.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)], accept=["json"]):
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                try:
                    cc.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
            assert got
            m = got[0]
            tag = m.delivery_tag
            r.hset(keys.deliveries, tag, 2)  # as if it had come back twice
            assert r.hget(keys.holder_of, tag).decode().startswith("w1@h.me ")
            assert r.sismember(keys.held("w1@h.me"), tag)
            if how == "ack":
                m.ack()
            elif how == "reject":
                m.reject()
            elif how == "ack_many":
                ack_many([m])
            else:
                with r.pipeline(transaction=False) as pipe:
                    acked = ack_in(pipe, [m], redis_server(channel.client))
                    pipe.execute()
                forget_acked(acked)
            assert r.hlen(keys.unacked) == 0
            assert not r.hexists(keys.holder_of, tag) and not r.sismember(keys.held("w1@h.me"), tag)
            assert not r.hexists(keys.deliveries, tag)
        channel.close()


def test_a_requeue_by_a_live_worker_keeps_the_count_and_the_sweep_adds_one(
    conn: Connection, r: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    queue = Queue(f"{prefix}.qr", Exchange(f"{prefix}.qr", type="direct"), routing_key=f"{prefix}.qr")
    got: list = []
    with conn.channel() as pub, conn.clone() as cc:
        Producer(pub).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                              serializer="json")  # fmt: skip
        channel = cc.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)], accept=["json"]):
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                try:
                    cc.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
                if len(got) == 1 and got[0].delivery_tag and not got[0].acknowledged:
                    got[0].reject(requeue=True)  # handed back: not a failed delivery
            assert len(got) == 2
            tag = got[1].delivery_tag
            assert not r.hexists(keys.deliveries, tag)
            # the visibility sweep restores what is older than the timeout: a failed delivery
            r.zadd(keys.unacked_index, {tag: 1})
            channel.qos.restore_visible(num=None, interval=1)
            assert int(r.hget(keys.deliveries, tag)) == 1
            assert not r.hexists(keys.holder_of, tag)
        channel.close()


def test_dead_letters_are_listed_requeued_and_purged_even_when_not_utf8(r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    q = keys.model_queue("m")
    lst = keys.queue_list_key(q, 0)
    good, odd = _envelope("g", q), _envelope("o", q)
    odd["headers"]["id"] = "id-\udcff"
    raw_odd = json.dumps(odd, ensure_ascii=False).encode("utf-8", "surrogateescape")  # a lone 0xff byte
    r.lpush(lst, json.dumps(good), raw_odd)
    r.hset(keys.deliveries, mapping={"g": 5, "o": 5})  # both came back five times already
    k, a = pop_keys_args(keys.kombu_prefix, [lst], now=time.time(), most=10, holder="w1@h.a", max_deliveries=5)
    assert r.register_script(POP_AND_RECORD)(keys=k, args=a)[2::3] == [1, 1]  # both dead-lettered
    store = FailoverStore(r, keys)
    entries = store.dead_letters()
    assert sorted(e.tag for e in entries) == ["g", "o"] and r.llen(lst) == 0 and r.hlen(keys.unacked) == 0
    assert {e.deliveries for e in entries} == {5} and {e.queue for e in entries} == {q}
    assert store.requeue(["g"]) == 1
    assert json.loads(r.rpop(lst)) == good and not r.hexists(keys.deliveries, "g")
    assert store.purge(["o"]) == 1 and store.dead_letters() == []
