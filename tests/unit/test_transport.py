"""mesh/broker/transport.py against a real Redis and a real kombu consumer: a message never leaves its
queue unrecorded, idle consumers wait on bells, and bells neither pile up nor stay behind."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from mesh.broker.transport import (
    POP_AND_RECORD, ack_in, bulk, envelope_problem, forget_acked, on_rejected, pop_keys, pop_keys_args,
    redis_server, wait_packet,
)
from mesh.protocol.keys import BELL_TTL_MS, Keys, queue_bell
from mesh.tools.launcher import wait_for

TRANSPORT = "mesh.broker.transport:Transport"


@pytest.fixture
def conn(redis_url: str, prefix: str) -> Iterator[Connection]:
    c = Connection(
        redis_url,
        transport=TRANSPORT,
        transport_options={"global_keyprefix": Keys(prefix).kombu_prefix, "polling_interval": 0.1},
    )
    try:
        yield c
    finally:
        c.release()


def drain(conn: Connection, seconds: float) -> None:
    try:
        conn.drain_events(timeout=seconds)
    except TimeoutError:
        pass


def drain_until(conn: Connection, done, seconds: float = 10, step: float = 0.3) -> None:
    """Drain `conn` until `done()` or `seconds` pass (the caller asserts what it waited for)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        drain(conn, step)


def _queue(prefix: str) -> Queue:
    name = f"{prefix}.t.{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange("", type="direct"), routing_key=name)


def test_pop_script_records_each_message_in_the_same_step(redis_url: str, prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    p = Keys(prefix).kombu_prefix
    hi, lo = p + "q\x06\x160", p + "q\x06\x165"

    def envelope(tag: str) -> dict:
        return {"body": "e30=", "properties": {"delivery_tag": tag,
                                               "delivery_info": {"exchange": "", "routing_key": "q"}}}  # fmt: skip

    for tag in ("a", "b", "c"):
        r.lpush(lo, json.dumps(envelope(tag)))
    r.lpush(hi, json.dumps(envelope("h")))
    r.lpush(hi, "not json")
    script = r.register_script(POP_AND_RECORD)
    keys, args = pop_keys_args(p, [hi, lo], now=123.5, most=3, max_bytes=1 << 20)
    # at most 3: the first list first, oldest first; garbage comes back unrecorded (tag '')
    out = script(keys=keys, args=args)
    triples = [(out[i].decode(), out[i + 1], out[i + 2].decode()) for i in range(0, len(out), 3)]
    assert [(k, t) for k, _, t in triples] == [(hi, "h"), (hi, ""), (lo, "a")]
    assert json.loads(triples[0][1]) == envelope("h") and triples[1][1] == b"not json"
    # recorded as kombu's QoS.append would: hash [message, exchange, routing_key], index by time
    assert json.loads(r.hget(p + "unacked", "a")) == [envelope("a"), "", "q"]
    assert r.zscore(p + "unacked_index", "h") == 123.5
    assert sorted(r.hkeys(p + "unacked")) == [b"a", b"h"]
    keys, args = pop_keys_args(p, [hi, lo], now=1, most=16, max_bytes=1 << 20)
    out = script(keys=keys, args=args)
    assert out[2::3] == [b"b", b"c"]
    assert script(keys=keys, args=args) == []
    r.delete(p + "unacked", p + "unacked_index")


def test_a_message_is_recorded_as_from_the_queue_it_was_popped_from(redis_url: str, prefix: str) -> None:
    """The envelope's exchange and routing key are the producer's word; the unacked record (what
    every restore routes by) names the queue the message really left, so a message pushed onto
    a model queue claiming the control queue goes back to the model queue (docs/security.md)."""
    r = redis.Redis.from_url(redis_url)
    p = Keys(prefix).kombu_prefix
    model_lo = p + f"{prefix}.model.m\x06\x165"
    forged = {"body": "e30=", "properties": {"delivery_tag": "f", "delivery_info": {
        "exchange": f"{prefix}.default", "routing_key": f"{prefix}.control"}}}  # fmt: skip
    r.lpush(model_lo, json.dumps(forged))
    r.lpush(p + f"{prefix}.model.m", json.dumps({**forged, "properties": {**forged["properties"], "delivery_tag": "g"}}))
    keys, args = pop_keys_args(p, [p + f"{prefix}.model.m", model_lo], now=1.0, most=16, max_bytes=1 << 20)
    out = r.register_script(POP_AND_RECORD)(keys=keys, args=args)
    assert out[2::3] == [b"g", b"f"]
    for tag in ("f", "g"):
        assert json.loads(r.hget(p + "unacked", tag))[1:] == ["", f"{prefix}.model.m"]
    r.delete(p + "unacked", p + "unacked_index")


def test_consumer_never_pops_a_queue_unrecorded_and_idles_on_bells(
    conn: Connection, redis_url: str, prefix: str
) -> None:
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    unacked = Keys(prefix).kombu_prefix + "unacked"
    queue_key = Keys(prefix).kombu_prefix + queue.name
    seen: list[str] = []
    recorded_at_delivery: list[bool] = []

    def on_message(body, message) -> None:
        recorded_at_delivery.append(r.hexists(unacked, message.delivery_tag))
        seen.append(body["n"])
        message.ack()

    commands: list[str] = []
    monitor_ready = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        with r.monitor() as m:
            monitor_ready.set()
            for cmd in m.listen():
                if cmd.get("client_type") != "lua":  # commands a script runs are listed too
                    commands.append(cmd["command"])
                if stop.is_set():
                    return

    threading.Thread(target=watch, daemon=True).start()
    monitor_ready.wait(5)
    with conn.channel() as pub_channel, conn.clone() as consumer_conn:
        producer = Producer(pub_channel)
        consumer_channel = consumer_conn.channel()
        with Consumer(consumer_channel, [queue], callbacks=[on_message], accept=["json"]):
            sent = 0
            for burst in (1, 5, 1, 20, 1):  # single messages to an idle consumer, and bursts
                for _ in range(burst):
                    producer.publish({"n": str(sent)}, exchange=queue.exchange, routing_key=queue.name,
                                     declare=[queue], serializer="json")  # fmt: skip
                    sent += 1
                drain_until(consumer_conn, lambda: len(seen) >= sent, step=0.5)
                drain(consumer_conn, 0.3)  # idle: the consumer goes back to waiting on the bell
        consumer_channel.close()
    stop.set()
    r.ping()  # one more command so the monitor thread sees `stop`

    assert seen == [str(i) for i in range(sent)]
    assert all(recorded_at_delivery)
    ours = [c for c in commands if queue.name in c]
    # the queue's lists are only ever popped by the script (EVALSHA); BRPOP waits on bells only
    assert not [c for c in ours if c.startswith(("BRPOP", "RPOP", "BLMOVE", "LMOVE")) and
                f"{queue_key} " in c + " "], ours[:10]  # fmt: skip
    assert any(c.startswith("BRPOP") and "_kombu.bell." in c for c in ours)
    assert any(c.startswith("EVALSHA") for c in ours)
    # every message was acked: nothing left in the unacked set for this queue
    assert not [v for v in r.hvals(unacked) if queue.name.encode() in v]


def test_a_message_to_an_idle_consumer_costs_one_pop_in_one_round_trip(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle, the consumer waits on the bells with the pop script sent behind the wait: a ring
    returns the message in the same round trip, taken by one script call that finds the queues
    drained (it took fewer than it could), and the consumer waits on the bells again. Before,
    it sent the script only after the bell's reply (two round trips per message at one
    client), and before that it also popped once more and found nothing."""
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    commands: list[str] = []
    monitor_ready, stop = threading.Event(), threading.Event()

    def watch() -> None:
        with r.monitor() as m:
            monitor_ready.set()
            for cmd in m.listen():
                if cmd.get("client_type") != "lua":
                    commands.append(cmd["command"])
                if stop.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    monitor_ready.wait(5)
    seen: list[int] = []
    writes: list[int] = []  # the consumer's writes of a poll (a wait or a pop) of this queue
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, *args, **kwargs):
        packed = b"".join(command) if isinstance(command, list) else command
        if queue.name.encode() in packed and (b"BRPOP" in packed or b"EVALSHA" in packed):
            writes.append(1)
        return send(self, command, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    # no timed-out wait (each polls once more) during the test
    options = {"global_keyprefix": Keys(prefix).kombu_prefix, "brpop_timeout": 60}
    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as consumer_conn, \
            Connection(redis_url, transport=TRANSPORT, transport_options=options) as pub_conn:  # fmt: skip
        producer = Producer(pub_conn.channel())
        consumer_channel = consumer_conn.channel()
        with Consumer(consumer_channel, [queue], callbacks=[lambda b, m: (seen.append(b["n"]), m.ack())],
                      accept=["json"]):  # fmt: skip
            drain(consumer_conn, 0.3)  # the first poll (a pop, empty) and then the wait on the bell
            for n in range(6):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.name,
                                 declare=[queue], serializer="json")  # fmt: skip
                drain_until(consumer_conn, lambda: len(seen) > n, step=0.5)
                drain(consumer_conn, 0.2)
            polls = len(writes)
            r.echo("before-close")  # everything Redis ran before the close is in `commands` once this is
            wait_for(lambda: any("before-close" in c for c in commands), 10, interval=0.01,
                     what="MONITOR to show the marker")  # fmt: skip
            before_close = list(commands)
        consumer_channel.close()  # reads the wait in flight: Redis runs the script behind it then
    stop.set()
    r.ping()
    watcher.join(10)  # before its connection goes with the pool
    r.close()
    assert seen == list(range(6))
    pops = [c for c in before_close if c.startswith("EVALSHA") and queue.name in c]
    assert len(pops) == 1 + 6, pops  # the first poll, then one per message
    # the first poll, one per message, and the wait in flight at the end
    assert polls == 1 + 6 + 1, polls


def test_bell_holds_at_most_one_ring_expires_and_goes_with_the_queue(
    conn: Connection, redis_url: str, prefix: str
) -> None:
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    bell = Keys(prefix).queue_bell(queue.name)
    with conn.channel() as channel:
        producer = Producer(channel)
        for n in range(50):  # nobody consumes: the bell must not grow with the queue
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.name,
                             declare=[queue], serializer="json")  # fmt: skip
        assert r.llen(bell) == 1
        assert 0 < r.pttl(bell) <= BELL_TTL_MS
        assert channel.queue_purge(queue.name) == 50
        assert not r.exists(bell)
        producer.publish({"n": 0}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
        channel._delete(queue.name, "", queue.name, None)
    assert not r.exists(bell)
    assert not r.exists(Keys(prefix).kombu_prefix + queue.name)


def test_message_pushed_without_a_bell_is_still_consumed(conn: Connection, redis_url: str, prefix: str) -> None:
    # a producer on stock kombu pushes without ringing: the consumer's timed-out wait polls
    queue = _queue(prefix)
    got: list[int] = []
    with conn.channel() as channel, Consumer(channel, [queue], callbacks=[lambda b, m: (got.append(b["n"]), m.ack())],
                                             accept=["json"]):  # fmt: skip
        with Connection(redis_url, transport_options={"global_keyprefix": Keys(prefix).kombu_prefix}) as stock:
            Producer(stock.channel()).publish({"n": 7}, exchange=queue.exchange, routing_key=queue.name,
                                              serializer="json")  # fmt: skip
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            drain(conn, 0.5)
    assert got == [7]


def test_acks_ride_in_another_pipeline_on_the_same_redis_and_only_there(
    conn: Connection, redis_url: str, prefix: str
) -> None:
    # the worker's results thread acks a batch in its results pipeline (ack_in), the consumer
    # thread then forgets the messages locally (forget_acked): nothing stays in kombu's
    # unacked records, and a restore of the channel's unacked messages puts nothing back
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    kp = Keys(prefix).kombu_prefix
    got: list = []
    with conn.channel() as channel, Consumer(channel, [queue], callbacks=[lambda b, m: got.append(m)],
                                             accept=["json"]):  # fmt: skip
        producer = Producer(channel)
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.name,
                             declare=[queue], serializer="json")  # fmt: skip
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            drain(conn, 0.5)
        assert len(got) == 3 and r.hlen(kp + "unacked") == 3

        elsewhere = redis.Redis(host="192.0.2.1", port=6379, db=0)  # another server: not added
        with elsewhere.pipeline(transaction=False) as other:
            assert ack_in(other, got, redis_server(elsewhere)) == []
            assert len(other.command_stack) == 0

        with r.pipeline(transaction=False) as pipe:
            added = ack_in(pipe, got[:2], redis_server(r))
            pipe.execute()
        assert added == got[:2]
        assert r.hlen(kp + "unacked") == 1 and r.zcard(kp + "unacked_index") == 1
        forget_acked(added)
        assert all(m.acknowledged for m in added) and not got[2].acknowledged
        assert set(channel.qos._delivered) - channel.qos._dirty == {got[2].delivery_tag}

        channel.qos.restore_unacked()  # what a lost connection does: only the third goes back
        assert r.llen(kp + queue.name) == 1 and r.hlen(kp + "unacked") == 0
        channel.queue_purge(queue.name)


# ----------------------------------------------------------------------------- hostile list items
# Issue 21: an exception while decoding, checking or delivering one message escaped the event
# loop ("Unrecoverable error": the worker stopped). Each is dropped alone, reported, forgotten.

NESTED = "[" * 100_000 + "]" * 100_000


def _envelope(queue: str, **spoil) -> dict:
    props = {"delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": "", "routing_key": queue},
             "body_encoding": "base64", "priority": 0}  # fmt: skip
    env = {"body": "eyJuIjogMX0=", "content-type": "application/json", "content-encoding": "utf-8",
           "headers": {}, "properties": props}  # fmt: skip  (body: {"n": 1})
    for path, value in spoil.items():
        *parents, leaf = path.split("__")
        node = env
        for p in parents:
            node = node[p]
        node[leaf] = value
    return env


BAD_ENVELOPES = {
    "surrogate tag": {"properties__delivery_tag": "X\ud800"},
    "empty tag": {"properties__delivery_tag": ""},
    "integer tag": {"properties__delivery_tag": 7},
    "huge tag": {"properties__delivery_tag": "t" * 10_000},
    "integer routing key": {"properties__delivery_info__routing_key": 12345},
    "list exchange": {"properties__delivery_info__exchange": ["x"]},
    "delivery_info a list": {"properties__delivery_info": [1]},
    "unknown body encoding": {"properties__body_encoding": "rot13"},
    "list body encoding": {"properties__body_encoding": ["base64"]},
    "string priority": {"properties__priority": "high"},
    "bool priority": {"properties__priority": True},
    "priority out of range": {"properties__priority": 10**30},
    "reply_to an object": {"properties__reply_to": {"a": 1}},
    "body a number": {"body": 12},
    "content-type a list": {"content-type": ["application/json"]},
    "headers a list": {"headers": [1]},
    "task a list": {"headers": {"task": ["mesh.infer"], "id": "a"}},
    "id a dict": {"headers": {"task": "mesh.infer", "id": {"x": 1}}},
    "id a surrogate": {"headers": {"task": "mesh.infer", "id": "X\ud800"}},
    "properties a string": {"properties": "x"},
    "no delivery_info": {"properties__delivery_info": None},
    "delivery_info without exchange": {"properties__delivery_info": {"routing_key": "q"}},
}


@pytest.mark.parametrize("spoil", BAD_ENVELOPES.values(), ids=BAD_ENVELOPES.keys())
def test_envelope_problem_names_every_field_of_the_wrong_type(spoil) -> None:
    assert envelope_problem(_envelope("q")) is None
    assert envelope_problem(_envelope("q", **spoil)) is not None


def test_a_hostile_item_is_dropped_alone_reported_and_forgotten(conn: Connection, redis_url: str, prefix: str) -> None:
    queue = _queue(prefix)
    keys = Keys(prefix)
    reported: list[tuple[str, bool]] = []
    on_rejected(keys.kombu_prefix, lambda reason, env: reported.append((reason, env is not None)))
    got: list[str] = []
    boom = _envelope(queue.name)  # a good envelope whose handler raises (a strategy bug, say)
    boom["body"] = "eyJuIjogImJvb20ifQ=="  # {"n": "boom"}

    def callback(body, message):
        if body["n"] == "boom":
            raise KeyError("exchange")  # kombu counts KeyError as a connection error: not here
        got.append(body["n"])
        message.ack()

    r = redis.Redis.from_url(redis_url)
    # a tag of invalid UTF-8: Lua's cjson lets it through, so the pop script records it
    not_utf8 = json.dumps(_envelope(queue.name, properties__delivery_tag="TAG")).encode().replace(b"TAG", b"\xff\xfe")
    items = [NESTED, not_utf8, json.dumps(_envelope(queue.name, properties__delivery_tag="X\ud800")),
             json.dumps(_envelope(queue.name, properties__delivery_info__routing_key=12345)),
             json.dumps(boom), json.dumps(_envelope(queue.name))]  # fmt: skip
    try:
        with conn.channel() as channel, Consumer(channel, [queue], callbacks=[callback], accept=["json"]):
            r.lpush(keys.queue_list_key(queue.name, 0), *items)  # the pop script takes them in one go
            drain_until(conn, lambda: got, step=0.5)
        assert got == [1]  # the good one, after five that each raised somewhere before
        assert reported == [("not_json", False), ("not_json", False), ("bad_envelope", True),
                            ("bad_envelope", True), ("undeliverable", True)]  # fmt: skip
        assert r.hlen(keys.kombu_prefix + "unacked") == 0 and r.zcard(keys.kombu_prefix + "unacked_index") == 0
    finally:
        on_rejected(keys.kombu_prefix, None)
        r.close()


def test_a_poll_is_packed_as_redis_py_packs_it_in_every_order_of_its_queues(conn: Connection, prefix: str) -> None:
    """The poll is packed from each queue's cached chunks (`_poll_chunks`), not by redis-py:
    byte for byte what redis-py sends for the same commands, whichever queue the cycle puts
    first, for queue names outside ASCII, and after a queue is added."""
    names = [f"{prefix}.model.模型-{i}" for i in range(3)]
    channel = conn.channel()
    try:
        channel.mesh_holder = "w1@hôst"
        packer = redis.Connection()  # packs without connecting
        p = channel.global_keyprefix

        def by_redis_py(queues: list[str], now: float, most: int) -> bytes:
            lists = [p + channel._q_for_pri(q, pri) for pri in channel.priority_steps for q in queues]
            keys = pop_keys(p, lists, "w1@hôst")
            _, args = pop_keys_args(p, lists, now=now, most=most, holder="w1@hôst", holder_ttl_ms=6000)
            bells = [p + queue_bell(q) for q in queues]
            return b"".join(packer.pack_commands([["BRPOP", *bells, 1],
                                                       ["EVALSHA", "f" * 40, len(keys), *keys, *args]]))  # fmt: skip

        channel._pop_sha = "f" * 40
        for queues in (names, names[1:] + names[:1], names[2:] + names[:2], names[:1], [*names, f"{prefix}.x"]):
            keys, bells = channel._poll_chunks(queues)
            _, args = pop_keys_args(p, [], now=1.5, most=16, holder="w1@hôst", holder_ttl_ms=6000)
            ours = wait_packet(bells, 1) + b"".join(
                [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)), bulk("f" * 40), bulk(len(keys)),
                 *keys, *map(bulk, args)])  # fmt: skip
            assert ours == by_redis_py(queues, 1.5, 16)
        # the pop call itself, with its own clock and room
        packet = channel._pop_packet(channel._poll_chunks(names)[0])
        assert packet.startswith(b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + 8 + 3 * len(channel.priority_steps) + 7))
        assert all(bulk(k) in packet for k in pop_keys(p, [], "w1@hôst"))
    finally:
        channel.close()


def test_bulk_encodes_as_redis_py_does() -> None:
    encoder = redis.Redis().connection_pool.get_encoder()
    for value in ("abc", "模型", b"\xff\x00", 0, -7, 16, 1.5, 1796646952.0855787, 0.1, ""):
        encoded = encoder.encode(value)
        assert bulk(value) == b"$%d\r\n%s\r\n" % (len(encoded), encoded)


def test_a_queue_consumed_later_is_waited_on_and_popped_too(conn: Connection, redis_url: str, prefix: str) -> None:
    """The poll's keys are packed once per queue (`_poll_chunks`): a queue added to the
    consumer is in the next poll's bells and lists."""
    first, second = _queue(prefix), _queue(prefix)
    got: list[str] = []
    with conn.channel() as pub, conn.clone() as consumer_conn:
        producer = Producer(pub)
        channel = consumer_conn.channel()
        with Consumer(channel, [first], callbacks=[lambda b, m: (got.append(b["q"]), m.ack())],
                      accept=["json"]) as consumer:  # fmt: skip
            producer.publish({"q": "first"}, exchange=first.exchange, routing_key=first.name,
                             declare=[first], serializer="json")  # fmt: skip
            drain_until(consumer_conn, lambda: got == ["first"])
            consumer.add_queue(second)
            consumer.consume()
            producer.publish({"q": "second"}, exchange=second.exchange, routing_key=second.name,
                             declare=[second], serializer="json")  # fmt: skip
            drain_until(consumer_conn, lambda: got == ["first", "second"])
        channel.close()
    assert got == ["first", "second"]


def test_a_bell_of_the_wrong_type_is_deleted_and_its_queue_still_served(
    conn: Connection, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any producer may write a queue's bell. One that is not a list made every wait on the
    bells fail (WRONGTYPE) and the error stopped the worker; the consumer now deletes it, says
    so, and serves the queue (the next ring makes a new bell)."""
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    bell = Keys(prefix).queue_bell(queue.name)
    got: list[int] = []
    options = {"global_keyprefix": Keys(prefix).kombu_prefix}
    with conn.channel() as pub, conn.clone() as consumer_conn:
        channel = consumer_conn.channel()
        with Consumer(channel, [queue], callbacks=[lambda b, m: (got.append(b["n"]), m.ack())], accept=["json"]):
            drain(consumer_conn, 0.3)  # idle: waiting on the bell
            r.set(bell, "not a list")
            with Connection(redis_url, transport_options=options) as stock:  # pushes without ringing
                Producer(stock.channel()).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.name,
                                                  declare=[queue], serializer="json")  # fmt: skip
            drain_until(consumer_conn, lambda: got)
            assert got == [1]
            assert r.type(bell) in (b"none", b"list")
            Producer(pub).publish({"n": 2}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            drain_until(consumer_conn, lambda: got == [1, 2])
        channel.close()
    r.close()
    assert got == [1, 2]
    assert any("deleted the bell" in rec.getMessage() and "not a list" in rec.getMessage() for rec in caplog.records)


def test_a_publish_replaces_a_bell_of_the_wrong_type(conn: Connection, redis_url: str, prefix: str) -> None:
    """kombu's publish path (send_task producers, commands, requeues) rang with plain commands,
    which failed on a bell that is not a list after the message was on its queue: the publish
    raised for a message that would be served."""
    queue = _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    bell = Keys(prefix).queue_bell(queue.name)
    r.set(bell, "not a list")
    with conn.channel() as channel:
        Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.name, declare=[queue],
                                  serializer="json")  # fmt: skip
    assert r.lrange(bell, 0, -1) == [b"1"]
    assert 0 < r.pttl(bell) <= BELL_TTL_MS
    assert r.llen(Keys(prefix).kombu_prefix + queue.name) == 1
    r.close()


def test_a_queue_key_of_the_wrong_type_is_skipped_and_the_others_served(
    conn: Connection, redis_url: str, prefix: str
) -> None:
    """Any producer may write a queue's list key. One holding another type failed the whole pop
    script (WRONGTYPE), and the error stopped the worker; it is now skipped."""
    broken, fine = _queue(prefix), _queue(prefix)
    r = redis.Redis.from_url(redis_url)
    got: list[int] = []
    with conn.channel() as pub, conn.clone() as consumer_conn:
        channel = consumer_conn.channel()
        with Consumer(channel, [broken, fine], callbacks=[lambda b, m: (got.append(b["n"]), m.ack())],
                      accept=["json"]):  # fmt: skip
            drain(consumer_conn, 0.3)
            for pri in (0, 3, 6, 9):  # every priority list of the queue kombu may pop
                key = Keys(prefix).kombu_prefix + (broken.name if pri == 0 else f"{broken.name}\x06\x16{pri}")
                r.set(key, "not a list")
            Producer(pub).publish({"n": 1}, exchange=fine.exchange, routing_key=fine.name, declare=[fine],
                                  serializer="json")  # fmt: skip
            drain_until(consumer_conn, lambda: got)
        channel.close()
    r.close()
    assert got == [1]


def test_a_binding_table_of_the_wrong_type_is_deleted_and_the_queue_declared(
    conn: Connection, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any producer may write a model queue's binding tables. One that is not a set failed the
    declare (WRONGTYPE): the worker never started consuming the queue of a model it had loaded,
    whose requests then waited forever. The declare now deletes it, says so, and binds afresh."""
    name = f"{prefix}.t.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)  # as Celery declares a model queue
    r = redis.Redis.from_url(redis_url)
    tables = Keys(prefix).queue_bindings(name)
    for table in tables:
        r.set(table, "not a set")
    got: list[int] = []
    with conn.channel() as pub, conn.clone() as consumer_conn:
        channel = consumer_conn.channel()
        with Consumer(channel, [queue], callbacks=[lambda b, m: (got.append(b["n"]), m.ack())], accept=["json"]):
            assert [r.type(t) for t in tables] == [b"set", b"set"]
            # routed through the table the declare wrote again
            Producer(pub).publish({"n": 1}, exchange=queue.exchange, routing_key=name, serializer="json")
            drain_until(consumer_conn, lambda: got)
        channel.close()
    r.close()
    assert got == [1]
    deleted = [rec.getMessage() for rec in caplog.records if "deleted the binding table" in rec.getMessage()]
    assert len(deleted) == 2 and all("not a set" in m for m in deleted)
