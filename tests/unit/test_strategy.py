"""workers/strategy.py: the message handlers Celery builds from our Strategies, fed real kombu
messages encoded like a producer's, on a fake Celery consumer (no worker process). Refused
requests are answered in the real result backend (Redis)."""

from __future__ import annotations

import json
import pickle
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from celery.result import AsyncResult
from celery.worker import state as worker_state
from kombu.message import Message
from kombu.serialization import dumps, prepare_accept_content

from mesh.app import create_app
from mesh.errors import InvalidArgument, RequestTooLarge
from mesh.models import Command
from mesh.protocol.keys import Keys
from mesh.protocol.messages import COMMAND_TASK, INFER_TASK, REBALANCE_TASK
from mesh.settings import MeshSettings
from workers.strategy import command_strategy, control_strategy, infer_strategy

MAX_REQUEST_BYTES = 1024  # the handler refuses bodies above twice this


class FakeMesh:
    """MeshWorker as the strategies use it: what reached it, in order."""

    def __init__(self, prefix: str, redis_url: str) -> None:
        self.keys = Keys(prefix)
        self.settings = MeshSettings(prefix=prefix, redis_url=redis_url, max_request_bytes=MAX_REQUEST_BYTES)
        self.requests: list[tuple] = []
        self.controls: list[tuple] = []
        self.commands: list[Command] = []
        self.rejected: list[str] = []
        self.served = {"digits"}  # models with a buffer here
        self.acked_soon: list = []  # messages handed to the consumer port's batched ack
        self.consumer = SimpleNamespace(ack_soon=self.acked_soon.append)

    def on_request(self, model_id, req, items=1, high=False, requeue=True) -> bool:
        if model_id not in self.served and not requeue:
            return False
        self.requests.append((model_id, req, items, high))
        return True

    def reject_message(self, reason: str) -> None:
        self.rejected.append(reason)

    def run_control(self, name, fn, kwargs) -> None:
        self.controls.append((name, fn, kwargs))

    def on_command(self, cmd: Command) -> None:
        self.commands.append(cmd)


def no_pool(*args, **kwargs):
    raise AssertionError("a mesh.infer request was sent to the execution pool")


@pytest.fixture
def app(redis_url, prefix):
    a = create_app(MeshSettings(prefix=prefix, redis_url=redis_url))
    yield a
    a.close()


@pytest.fixture
def consumer(redis_url, prefix):
    c = SimpleNamespace(
        mesh=FakeMesh(prefix, redis_url),
        hostname="w1@test",
        event_dispatcher=None,
        pool=SimpleNamespace(apply_async=no_pool),  # mesh.infer never runs through the pool
        controller=SimpleNamespace(state=SimpleNamespace(revoked=set())),
        connection_errors=(),
    )
    yield c
    for _, req, _, _ in c.mesh.requests:  # out of Celery's reserved requests again
        worker_state.task_ready(req)


class Acks:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def ack(self, logger, errors, multiple=False) -> None:
        self.log.append(("ack",))

    def reject(self, logger, errors, requeue=False) -> None:
        self.log.append(("reject", requeue))


def task_message(app, task_name, queue, kwargs=None, *, priority=5, expires=None, body=None,
                 content_type=None, content_encoding=None, headers=None):
    """A kombu Message as the worker's kombu Consumer hands it over (protocol 2, JSON)."""
    task_id = str(uuid.uuid4())
    m = app.amqp.as_task_v2(task_id, task_name, args=(), kwargs=kwargs or {}, expires=expires)
    ctype, enc, data = dumps(m.body, serializer="json")
    return Message(
        body=data if body is None else body,
        delivery_tag=str(uuid.uuid4()),
        content_type=content_type or ctype,
        content_encoding=content_encoding or enc,
        headers={**m.headers, **(headers or {})},
        properties={**m.properties, "priority": priority},
        delivery_info={"exchange": "", "routing_key": queue},
        accept=prepare_accept_content(app.conf.accept_content),
    ), task_id


def infer_handler(app, consumer):
    return infer_strategy(app.tasks[INFER_TASK], app, consumer)


def run(handler, message, body=None):
    acks = Acks()
    handler(message, body, acks.ack, acks.reject, [])
    return acks.log


def failure_of(app, task_id):
    return AsyncResult(task_id, app=app).get(timeout=10)


# ------------------------------------------------------------------ mesh.infer


def test_a_request_reaches_the_model_of_its_queue_with_its_item_count(app, consumer, prefix):
    keys = Keys(prefix)
    handler = infer_handler(app, consumer)
    items = [{"inputs": []}, {"inputs": []}, {"inputs": []}]
    message, task_id = task_message(app, INFER_TASK, keys.model_queue("digits"), {"items": items},
                                    headers={"mm-model-id": "other"})  # the queue wins over the header
    assert run(handler, message) == []  # acked later, with its result
    assert len(consumer.mesh.requests) == 1
    model_id, req, n, high = consumer.mesh.requests[0]
    assert (model_id, n, high) == ("digits", 3, False)
    assert req.id == task_id and req.kwargs == {"items": items}
    assert req in worker_state.reserved_requests  # Celery's bookkeeping, as its default strategy does


@pytest.mark.parametrize("model_id", ["模型", "modèle 🤖", "a b:c*d/e?f%g"])
def test_a_request_on_a_utf8_models_queue_reaches_that_model_by_its_original_id(app, consumer, prefix, model_id):
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).model_queue(model_id), {"inputs": []},
                              headers={"mm-model-id": model_id})  # fmt: skip
    assert run(handler, message) == []
    assert [m for m, *_ in consumer.mesh.requests] == [model_id]


@pytest.mark.parametrize("tail", ["%zz", "%6D", "%c3%a8", "%00", "%C3"])
def test_a_queue_name_that_decodes_to_no_id_is_no_model_queue(app, consumer, prefix, tail):
    """A producer may push to any name under `<prefix>.model.`: one that is no encoding of a
    valid id is refused like any queue that is not a model queue (never requeued to itself)."""
    handler = infer_handler(app, consumer)
    message, task_id = task_message(app, INFER_TASK, f"{prefix}.model.{tail}", {"inputs": [1]})
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == [] and consumer.mesh.rejected == ["not_a_model_queue"]
    with pytest.raises(InvalidArgument, match="not a model queue"):
        failure_of(app, task_id)


def test_a_single_request_counts_one_item_and_priority_zero_is_high(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]}, priority=0)
    run(handler, message)
    assert [(m, n, high) for m, _, n, high in consumer.mesh.requests] == [("digits", 1, True)]


def test_the_model_header_names_the_model_off_a_model_queue(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).worker_queue("w1@test"), {"inputs": [1]},
                              headers={"mm-model-id": "digits"})
    run(handler, message)
    assert [m for m, *_ in consumer.mesh.requests] == ["digits"]


def test_a_too_large_request_is_answered_and_acked_without_decoding(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    big = {"inputs": [1.0] * (MAX_REQUEST_BYTES)}  # well over 2 * 1024 bytes of JSON
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), big)
    assert len(message.body) > 2 * MAX_REQUEST_BYTES
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == []
    assert message._decoded_cache is None  # never decoded
    with pytest.raises(RequestTooLarge, match="exceeds the worker's limit of 2048"):
        failure_of(app, task_id)


def test_a_request_just_under_the_limit_is_served(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1.0] * 300})
    assert len(message.body) <= 2 * MAX_REQUEST_BYTES
    run(handler, message)
    assert len(consumer.mesh.requests) == 1


def test_a_pickle_request_is_refused_with_the_reason_and_never_unpickled(app, consumer, prefix):
    handler = infer_handler(app, consumer)

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the worker unpickled a message",))

    message, task_id = task_message(
        app, INFER_TASK, Keys(prefix).model_queue("digits"), body=pickle.dumps([[], {"x": Boom()}, {}]),
        content_type="application/x-python-serialize", content_encoding="binary",
    )  # fmt: skip
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == []
    with pytest.raises(InvalidArgument, match="refused.*untrusted content"):
        failure_of(app, task_id)


def test_an_undecodable_request_is_refused_with_the_reason(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), body=b"{not json")
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == []
    with pytest.raises(InvalidArgument, match="refused"):
        failure_of(app, task_id)


@pytest.mark.parametrize("task_id", [None, "", "X\ud800", 42, ["a"], "a" * 256])
def test_a_request_without_a_usable_id_is_rejected_and_counted_never_buffered(app, consumer, prefix, task_id):
    """Nothing to answer under; an id that is no valid Redis key would fail its batch's results."""
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]})
    if task_id is None:
        del message.headers["id"]
    else:
        message.headers["id"] = task_id
    assert run(handler, message) == [("reject", False)]
    assert consumer.mesh.requests == [] and consumer.mesh.rejected == ["malformed"]


def test_an_old_protocol_message_is_rejected(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, _ = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]})
    assert run(handler, message, body={"task": INFER_TASK, "id": "x", "args": [], "kwargs": {}}) == [("reject", False)]
    assert consumer.mesh.requests == []


def test_an_expired_request_is_not_buffered(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]},
                                    expires=past)
    assert run(handler, message) == [("ack",)]  # Celery's revoked(): answered and acked
    assert consumer.mesh.requests == []
    assert AsyncResult(task_id, app=app).state == "REVOKED"


# ------------------------------------------------------------------ mesh.command


def command_handler(app, consumer):
    return command_strategy(app.tasks[COMMAND_TASK], app, consumer)


def test_a_command_is_acked_and_reaches_the_worker_as_a_command(app, consumer, prefix):
    handler = command_handler(app, consumer)
    kwargs = Command(op="unload", model_id="digits", reason="gone", fail_queued=True).model_dump(mode="json")
    message, _ = task_message(app, COMMAND_TASK, Keys(prefix).worker_queue("w1@test"), kwargs, priority=0)
    assert run(handler, message) == []  # not one by one: with the next moments' commands
    assert consumer.mesh.acked_soon == [message]
    assert consumer.mesh.commands == [Command(op="unload", model_id="digits", reason="gone", fail_queued=True)]
    assert isinstance(consumer.mesh.commands[0], Command)


@pytest.mark.parametrize(
    "kwargs,body",
    [
        ({"op": "explode", "model_id": "digits"}, None),  # unknown op
        ({"op": "load"}, None),  # no model id
        ({"op": "load", "model_id": "bad\x00id"}, None),  # invalid id (NUL)
        ({"op": "load", "model_id": "digits", "extra": 1}, None),  # strict: unknown field
        (None, json.dumps({"op": "load", "model_id": "digits"}).encode()),  # not [args, kwargs, embed]
    ],
)
def test_a_malformed_command_is_rejected_not_acked(app, consumer, prefix, kwargs, body):
    handler = command_handler(app, consumer)
    message, _ = task_message(app, COMMAND_TASK, Keys(prefix).worker_queue("w1@test"), kwargs, body=body)
    assert run(handler, message) == [("reject", False)]
    assert consumer.mesh.commands == [] and consumer.mesh.acked_soon == []


# ------------------------------------------------------------------ control tasks


def control_handler(app, consumer):
    return control_strategy(app.tasks[REBALANCE_TASK], app, consumer)


def test_a_control_run_goes_to_the_control_thread_with_its_kwargs(app, consumer, prefix):
    handler = control_handler(app, consumer)
    future = datetime.now(timezone.utc) + timedelta(seconds=60)
    message, _ = task_message(app, REBALANCE_TASK, Keys(prefix).control_queue, {"dry_run": True}, expires=future)
    assert run(handler, message) == [("ack",)]
    assert len(consumer.mesh.controls) == 1
    name, fn, kwargs = consumer.mesh.controls[0]
    assert name == REBALANCE_TASK and fn == app.tasks[REBALANCE_TASK].run and kwargs == {"dry_run": True}


def test_an_expired_control_run_is_acked_and_dropped(app, consumer, prefix):
    handler = control_handler(app, consumer)
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    message, _ = task_message(app, REBALANCE_TASK, Keys(prefix).control_queue, {}, expires=past)
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.controls == []


def test_a_control_run_with_non_object_kwargs_is_rejected(app, consumer, prefix):
    handler = control_handler(app, consumer)
    message, _ = task_message(app, REBALANCE_TASK, Keys(prefix).control_queue,
                              body=json.dumps([[], [1, 2], {}]).encode())
    assert run(handler, message) == [("reject", False)]
    assert consumer.mesh.controls == []


# ------------------------------------------------------------------ hostile messages (issue 21)


def test_an_integer_routing_key_is_no_model_queue_and_is_answered_not_raised(app, consumer, prefix):
    handler = infer_handler(app, consumer)
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]})
    message.delivery_info["routing_key"] = 12345
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == [] and consumer.mesh.rejected == ["not_a_model_queue"]
    with pytest.raises(InvalidArgument, match="not a model queue"):
        failure_of(app, task_id)


@pytest.mark.parametrize("header", [None, 42, "bad\x00id", "x" * 513, {"a": 1}, "other"])
def test_an_infer_off_a_model_queue_without_a_model_served_here_is_answered_invalid_argument(
    app, consumer, prefix, header
):
    """Before, it was requeued to the same queue, which it came straight back from: a loop."""
    handler = infer_handler(app, consumer)
    headers = {} if header is None else {"mm-model-id": header}
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).worker_queue("w1@test"), {"inputs": [1]},
                                    headers=headers)  # fmt: skip
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.requests == [] and consumer.mesh.rejected == ["not_a_model_queue"]
    with pytest.raises(InvalidArgument, match="not a model queue"):
        failure_of(app, task_id)


def test_a_body_nested_too_deep_is_answered_invalid_argument(app, consumer, prefix):
    nested = b"[" * 100_000 + b"]" * 100_000
    consumer.mesh.settings.max_request_bytes = len(nested)
    handler = infer_handler(app, consumer)
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), body=nested)
    assert run(handler, message) == [("ack",)]
    assert consumer.mesh.rejected == ["malformed"]
    with pytest.raises(InvalidArgument, match="recursion depth"):
        failure_of(app, task_id)


def test_whatever_a_handler_raises_rejects_that_message_alone(app, consumer, prefix):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    consumer.mesh.on_request = broken
    handler = infer_handler(app, consumer)
    message, task_id = task_message(app, INFER_TASK, Keys(prefix).model_queue("digits"), {"inputs": [1]})
    assert run(handler, message) == [("reject", False)]  # never requeued: it would come back
    assert consumer.mesh.rejected == ["unexpected"]
    with pytest.raises(InvalidArgument, match="RuntimeError"):
        failure_of(app, task_id)
    worker_state.reserved_requests.clear()


@pytest.mark.parametrize("make", [command_handler, control_handler])
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b"[[], {\"op\": 1}, {}]", b"null"])
def test_a_hostile_command_or_control_body_is_rejected_and_counted(app, consumer, prefix, make, body):
    handler = make(app, consumer)
    task = COMMAND_TASK if make is command_handler else REBALANCE_TASK
    message, _ = task_message(app, task, Keys(prefix).worker_queue("w1@test"), body=body)
    log = run(handler, message)
    assert log in ([("reject", False)], [("ack",)])  # [] kwargs-less control runs are fine
    assert consumer.mesh.commands == []
    if log == [("reject", False)]:
        assert consumer.mesh.rejected == ["malformed"]


def test_a_command_whose_action_raises_is_acked_once_and_counted(app, consumer, prefix):
    def broken(cmd):
        raise RuntimeError("a bug")

    consumer.mesh.on_command = broken
    handler = command_handler(app, consumer)
    kwargs = Command(op="load", model_id="digits").model_dump(mode="json")
    message, _ = task_message(app, COMMAND_TASK, Keys(prefix).worker_queue("w1@test"), kwargs)
    assert run(handler, message) == []  # settled before it raised: not rejected as well
    assert consumer.mesh.acked_soon == [message] and consumer.mesh.rejected == ["unexpected"]
