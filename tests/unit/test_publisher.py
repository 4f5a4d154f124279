"""The `mesh.infer` publisher against Celery's own: the same message, field by field, on the
same Redis lists, read back by kombu and Celery's worker Request as Celery's would be."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime, timezone

import pytest
import redis
from celery.worker.request import Request
from kombu.transport.virtual import Message as KombuMessage

from mesh.app import create_app
from mesh.broker.publisher import InferPublisher, Outbox, Prepared, kwargs_repr
from mesh.protocol.keys import Keys
from mesh.control.commands import send_command
from mesh.models import Command
from mesh.protocol.messages import COMMAND_TASK, INFER_TASK, MODEL_HEADER, PRIORITIES, SENT_AT_HEADER
from mesh.settings import MeshSettings
from mesh.store.state import StateStore

KWARGS = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}


@pytest.fixture
def app(redis_url, prefix):
    a = create_app(MeshSettings(prefix=prefix, redis_url=redis_url), redis_url)
    yield a
    a.close()


@pytest.fixture
def rds(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def popped(rds, keys: Keys, queue: str, priority: int) -> dict:
    raw = rds.rpop(keys.queue_list_key(queue, priority))
    assert raw is not None, "nothing on the list kombu would read"
    return json.loads(raw)


class _Channel:
    """What kombu's virtual Message asks of its channel to decode a body."""

    @staticmethod
    def decode_body(body, encoding=None):
        return base64.b64decode(body) if encoding == "base64" else body


ODD_KWARGS = [
    # NaN and infinities are legal values (orjson, the fast writer, would write null)
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [float("nan"), float("inf"), -1.5]}]},
    {"inputs": [{"name": "naïve-入力", "shape": [2], "datatype": "BYTES", "data": ["null", "é"]}],
     "outputs": [{"name": "ラベル"}]},
    {"inputs": [{"name": "i", "shape": [2], "datatype": "UINT64", "data": [2**64 - 1, 0]}]},
    {"items": [[{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.1]}]] * 3},
]


@pytest.mark.parametrize("priority, kwargs", [("high", KWARGS), ("normal", KWARGS)]
                         + [("normal", k) for k in ODD_KWARGS])  # fmt: skip
def test_the_message_is_the_one_celery_would_send(app, rds, prefix, priority, kwargs):
    keys = Keys(prefix)
    queue = keys.model_queue("m")
    pri = PRIORITIES[priority]
    expires_at = time.time() + 30
    headers = {MODEL_HEADER: "m", SENT_AT_HEADER: 1.5}
    reply_to = keys.reply_list("f" * 32)

    InferPublisher(rds, keys).publish("id-mesh", queue, kwargs, priority=pri, headers=headers,
                                      shadow="mesh.infer[m]", reply_to=reply_to, expires_at=expires_at)  # fmt: skip
    ours = popped(rds, keys, queue, pri)

    app.send_task(INFER_TASK, kwargs=kwargs, queue=queue, headers=headers, shadow="mesh.infer[m]",
                  priority=pri, expires=datetime.fromtimestamp(expires_at, timezone.utc),
                  task_id="id-celery", reply_to=reply_to)  # fmt: skip
    theirs = popped(rds, keys, queue, pri)

    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    differ = {"id", "root_id", "kwargsrepr"}
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == \
        {k: v for k, v in theirs["headers"].items() if k not in differ}  # fmt: skip
    assert set(ours["properties"]) == set(theirs["properties"]) - {"body_encoding"}
    for field in ("reply_to", "delivery_mode", "delivery_info", "priority"):
        assert ours["properties"][field] == theirs["properties"][field]
    assert ours["properties"]["correlation_id"] == "id-mesh"
    assert abs(int(ours["properties"]["expiration"]) - int(theirs["properties"]["expiration"])) < 1000

    # kombu and Celery's worker read ours exactly as they read Celery's
    decoded = []
    for envelope in (ours, theirs):
        message = KombuMessage(envelope, channel=_Channel())
        req = Request(message, app=app, task=app.tasks[INFER_TASK], decoded=False)
        decoded.append((json.dumps(req.kwargs), req.args, req.expires, req.reply_to, req.task_name,
                        message.headers[MODEL_HEADER]))  # fmt: skip
    assert decoded[0] == decoded[1]  # the kwargs as JSON text: NaN == NaN there


def test_a_command_is_the_message_celery_would_send(app, rds, prefix):
    keys = Keys(prefix)
    queue = keys.worker_queue("w1@host")
    kwargs = Command(op="load", model_id="模型 m").model_dump(mode="json")
    store = StateStore(rds, keys, MeshSettings(prefix=prefix))
    send_command(store, "w1@host", Command(op="load", model_id="模型 m"))
    assert rds.llen(keys.queue_bell(queue)) == 1  # a consumer waiting on the bell wakes
    ours = popped(rds, keys, queue, 0)
    app.send_task(COMMAND_TASK, kwargs=kwargs, queue=queue, ignore_result=True, priority=0)
    theirs = popped(rds, keys, queue, 0)

    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    differ = {"id", "root_id"}
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == \
        {k: v for k, v in theirs["headers"].items() if k not in differ}  # fmt: skip
    assert set(ours["properties"]) == set(theirs["properties"]) - {"body_encoding"}
    for field in ("delivery_mode", "delivery_info", "priority"):
        assert ours["properties"][field] == theirs["properties"][field]
    decoded = []
    for envelope in (ours, theirs):
        message = KombuMessage(envelope, channel=_Channel())
        req = Request(message, app=app, task=app.tasks[COMMAND_TASK], decoded=False)
        decoded.append((req.kwargs, req.args, req.task_name, req.ignore_result))
    assert decoded[0] == decoded[1]
    assert Command.model_validate(decoded[0][0]) == Command(op="load", model_id="模型 m")


def test_the_message_rings_its_queues_bell(app, rds, prefix):
    keys = Keys(prefix)
    queue = keys.model_queue("m")
    InferPublisher(rds, keys).publish("id", queue, KWARGS, priority=5, headers={}, shadow="s",
                                      reply_to=keys.reply_list("0" * 32))  # fmt: skip
    assert rds.lrange(keys.queue_bell(queue), 0, -1) == [b"1"]
    assert 0 < rds.pttl(keys.queue_bell(queue)) <= 30_000
    assert json.loads(rds.rpop(keys.queue_list_key(queue, 5)))["headers"]["expires"] is None


def test_a_bell_that_is_not_a_list_is_replaced_and_the_push_succeeds(app, rds, prefix):
    """Any producer may write a queue's bell: one of the wrong type failed the push after its
    message was on the list, so the caller saw an error for a request that would be served."""
    keys = Keys(prefix)
    queue = keys.model_queue("m")
    rds.set(keys.queue_bell(queue), "not a list")
    InferPublisher(rds, keys).publish("id", queue, KWARGS, priority=5, headers={}, shadow="s",
                                      reply_to=keys.reply_list("0" * 32))  # fmt: skip
    assert rds.lrange(keys.queue_bell(queue), 0, -1) == [b"1"]
    assert 0 < rds.pttl(keys.queue_bell(queue)) <= 30_000
    assert json.loads(rds.rpop(keys.queue_list_key(queue, 5)))["headers"]["id"] == "id"


def test_flower_sees_shapes_not_values():
    assert kwargs_repr(KWARGS) == "{'inputs': [x FP32[1, 3]]}"
    assert kwargs_repr({"items": [KWARGS["inputs"]] * 3}) == "{'items': <3 requests>}"


def test_one_push_carries_messages_for_several_queues(rds, prefix):
    keys = Keys(prefix)
    publisher = InferPublisher(rds, keys)
    sends = [("a", 0), ("b", 5), ("a", 5), ("a", 0)]
    publisher.push([publisher.prepare(f"id{i}", keys.model_queue(m), KWARGS, priority=p, headers={}, shadow="s",
                                      reply_to="r") for i, (m, p) in enumerate(sends)])  # fmt: skip
    got = {(m, p): [json.loads(x)["headers"]["id"] for x in rds.lrange(keys.queue_list_key(keys.model_queue(m), p), 0, -1)]
           for m, p in set(sends)}  # fmt: skip
    assert got == {("a", 0): ["id3", "id0"], ("b", 5): ["id1"], ("a", 5): ["id2"]}  # LPUSH: newest first
    assert all(rds.exists(keys.queue_bell(keys.model_queue(m))) for m in "ab")


def test_an_asyncio_loop_sends_what_one_turn_produced_in_one_push():
    pushes: list[list[list[str]]] = []

    def push_sends(sends):
        pushes.append([[p.message for p in send] for send in sends])
        return [None] * len(sends)

    outbox = Outbox(push_sends)

    async def main() -> None:
        await asyncio.gather(*(outbox.send(Prepared("l", "b", str(i))) for i in range(4)),
                             outbox.send(Prepared("w", "b", "load"), Prepared("l", "b", "4")))  # fmt: skip
        await outbox.send(Prepared("l", "b", "next turn"))

    asyncio.run(main())
    assert pushes == [[["0"], ["1"], ["2"], ["3"], ["load", "4"]], [["next turn"]]]


def test_a_failed_push_fails_every_send_of_its_turn_and_no_other():
    calls = []

    def push_sends(sends):
        calls.append(len(sends))
        if len(calls) == 1:
            raise redis.ConnectionError("Redis went away")
        return [None] * len(sends)

    outbox = Outbox(push_sends)

    async def main() -> list:
        first = await asyncio.gather(*(outbox.send(Prepared("l", "b", str(i))) for i in range(3)),
                                     return_exceptions=True)  # fmt: skip
        await outbox.send(Prepared("l", "b", "retry"))
        return first

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [redis.ConnectionError] * 3
    assert calls == [3, 1]


def test_a_queue_list_of_another_type_is_replaced_and_the_push_succeeds(rds, prefix, caplog):
    """A string where a model's list goes (any producer may write it) failed every request to
    that model until an operator deleted it; it is replaced like a bell of the wrong type, and
    logged."""
    keys = Keys(prefix)
    publisher = InferPublisher(rds, keys)
    squatted = keys.queue_list_key(keys.model_queue("bad"), 0)
    rds.set(squatted, "squatted")
    message = publisher.prepare("id0", keys.model_queue("bad"), KWARGS, priority=0, headers={}, shadow="s", reply_to="r")
    with caplog.at_level("ERROR", logger="mesh.broker.publisher"):
        assert publisher.push_sends([[message]]) == [None]
    assert rds.type(squatted) == b"list" and json.loads(rds.rpop(squatted))["headers"]["id"] == "id0"
    assert rds.exists(keys.queue_bell(keys.model_queue("bad")))
    assert f"replaced {squatted}: it held a string, not a list" in caplog.text


def test_sends_past_one_call_are_split_between_sends_never_inside_one(rds, prefix, monkeypatch):
    import mesh.broker.publisher as publisher_module

    monkeypatch.setattr(publisher_module, "PUSH_MAX", 3)
    keys = Keys(prefix)
    publisher = InferPublisher(rds, keys)
    calls: list[list[int]] = []
    real = publisher._push

    def counting(keys, args):
        calls.append([int(n) for n in args[1].split()])
        return real(keys=keys, args=args)

    publisher._push = counting
    sends = [[publisher.prepare(f"id{i}{j}", keys.model_queue("a"), KWARGS, priority=0, headers={}, shadow="s",
                                reply_to="r") for j in range(n)] for i, n in enumerate([2, 2, 1, 1, 1])]  # fmt: skip
    assert publisher.push_sends(sends) == [None] * 5
    assert calls == [[2], [2, 1], [1, 1]]
    assert rds.llen(keys.queue_list_key(keys.model_queue("a"), 0)) == 7


def test_celerys_publish_signals_run_and_may_add_headers(rds, prefix):
    """Tracing libraries inject their context in before_task_publish, as for send_task."""
    from celery import signals

    keys = Keys(prefix)
    queue = keys.model_queue("m")
    seen = []

    def inject(sender=None, headers=None, properties=None, routing_key=None, **kw):
        headers["traceparent"] = "00-abc-def-01"
        seen.append(("before", sender, routing_key, properties["correlation_id"]))

    def after(sender=None, headers=None, routing_key=None, body=None, **kw):
        seen.append(("after", sender, routing_key, headers["id"], body[1] == KWARGS))

    signals.before_task_publish.connect(inject, weak=False)
    signals.after_task_publish.connect(after, weak=False)
    try:
        InferPublisher(rds, keys).publish("id1", queue, KWARGS, priority=5, headers={}, shadow="s", reply_to="r")
    finally:
        signals.before_task_publish.disconnect(inject)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", INFER_TASK, queue, "id1"), ("after", INFER_TASK, queue, "id1", True)]
    assert popped(rds, keys, queue, 5)["headers"]["traceparent"] == "00-abc-def-01"


def test_a_send_whose_queue_the_user_may_not_write_fails_alone(rds, redis_url, prefix):
    """A producer user that may write model a's queue but not b's (an ACL; Redis 7 refuses the
    whole script call for one declared key it may not write, Redis 6 the one command): the
    send naming b fails with the permission error and pushes nothing after it, the sends to a
    around it are pushed (an asyncio turn's sends share a call)."""
    keys = Keys(prefix)
    user, password = f"{prefix}-writer", "pw-7c1e"
    kp = keys.kombu_prefix
    rds.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", "+@all", "-@dangerous", "-@admin",
                        f"~{kp}{keys.model_queue('a')}*", f"~{keys.queue_bell(keys.model_queue('a'))}")  # fmt: skip
    client = redis.Redis.from_url(redis_url, username=user, password=password)
    try:
        publisher = InferPublisher(client, keys)

        def message(i: int, model_id: str):
            return publisher.prepare(f"id{i}", keys.model_queue(model_id), KWARGS, priority=0, headers={},
                                     shadow="s", reply_to="r")  # fmt: skip

        # the second send stops at its refused first message: its message for a never goes
        outcomes = publisher.push_sends([[message(0, "a")], [message(1, "b"), message(9, "a")], [message(2, "a")]])
        assert outcomes[0] is None and outcomes[2] is None, outcomes
        assert isinstance(outcomes[1], redis.exceptions.NoPermissionError), outcomes
        got = [json.loads(x)["headers"]["id"] for x in rds.lrange(keys.queue_list_key(keys.model_queue("a"), 0), 0, -1)]
        assert got == ["id2", "id0"]
        assert rds.llen(keys.queue_list_key(keys.model_queue("b"), 0)) == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            publisher.push([message(3, "b")])
    finally:
        client.close()
        rds.execute_command("ACL", "DELUSER", user)
