"""Strategies: what the consumer thread does with each `mesh.infer` / `mesh.command` message.

Celery calls a task's Strategy once per consumer start to build the message handler
(celery/worker/consumer/consumer.py `Consumer.update_strategies`, celery/app/task.py
`Task.start_strategy`). Ours keeps what Celery's default strategy (celery/worker/strategy.py
`default`) does for bookkeeping
(revoked/expired check, task_reserved, the task-received event) and then, instead of
executing through the pool, appends the request to its model's buffer. Nothing here blocks:
the inference thread and the model manager do the work.

A handler never raises (issue 21): Celery's dispatch lets anything but InvalidTaskError,
ContentDisallowed and DecodeError through to the event loop (celery/worker/consumer/consumer.py
`on_task_received`), where it is "Unrecoverable error" and the worker stops. Each handler is
wrapped (`_guarded`): whatever escapes rejects that message alone (answered when it can be,
counted in `mesh_rejected_messages_total`), and the worker carries on.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from celery import signals
from celery.app.task import Context
from celery.utils.time import maybe_iso8601
from celery.worker.request import Request, create_request_cls
from celery.worker import state as worker_state
from celery.worker.state import task_reserved
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.imports import symbol_by_name

from mesh.broker.transport import usable_text
from mesh.errors import InvalidArgument, RequestTooLarge
from mesh.models import Command
from mesh.protocol.ids import is_valid_id
from mesh.protocol.messages import MODEL_HEADER, PRIORITIES

NORMAL_PRIORITY = PRIORITIES["normal"]

log = logging.getLogger("mesh.worker.strategy")


def infer_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any):
    mesh = consumer.mesh
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    send_events = bool(eventer and eventer.enabled and task.send_events)
    Req = create_request_cls(
        symbol_by_name(task.Request) if isinstance(task.Request, str) else task.Request,
        task, consumer.pool, hostname, eventer, app=app,
    )
    revoked_tasks = consumer.controller.state.revoked
    utc = app.uses_utc_timezone()
    model_from_queue = mesh.keys.model_from_queue
    # a message is decoded in full by Celery's Request; refuse oversized ones before that
    max_bytes = mesh.settings.max_request_bytes * 2  # JSON body vs the client's estimate

    def handler(message, body, ack, reject, callbacks, **kw):
        if body is not None:
            # protocol 1 / hybrid messages come from foreign producers we do not speak to
            log.error("rejecting a mesh.infer message in an old task protocol")
            mesh.reject_message("malformed")
            reject(log, consumer.connection_errors, False)
            return
        headers = message.headers if isinstance(message.headers, dict) else {}
        if not usable_text(headers.get("id")):
            # nothing to answer under (an id that cannot be a Redis key would also fail its
            # whole batch's results): dropped here, before it reaches a batch
            log.error("rejecting a mesh.infer message without a usable task id")
            mesh.reject_message("malformed")
            reject(log, consumer.connection_errors, False)
            return
        if len(message.body or b"") > max_bytes:
            _too_large(app, message, ack, consumer, max_bytes)
            return
        try:
            req = Req(
                message, on_ack=ack, on_reject=reject, app=app, hostname=hostname,
                eventer=eventer, task=task, connection_errors=consumer.connection_errors,
                body=message.body, headers=message.headers, decoded=False, utc=utc,
            )
            kwargs_ = req.kwargs
        except (ContentDisallowed, DecodeError) as exc:
            # JSON only, never pickle: answer the request with the reason rather than leave
            # its producer waiting (Celery would drop it silently)
            mesh.reject_message("malformed")
            _refuse(app, message, ack, consumer, InvalidArgument(f"mesh.infer message refused: {exc}"))
            return
        except Exception as exc:  # KeyError, TypeError, RecursionError (a body nested too deep), ...
            mesh.reject_message("malformed")
            _refuse(app, message, ack, consumer,
                    InvalidArgument(f"malformed mesh.infer message: {type(exc).__name__}: {str(exc)[:200]}"))
            return
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            return
        # the queue a message came from is authoritative: it is the concrete model
        info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        routing_key = info.get("routing_key")
        model_id = model_from_queue(routing_key) if isinstance(routing_key, str) else None
        on_model_queue = model_id is not None
        if not on_model_queue:
            # Off a model queue only the header names the model. Requeued, such a message came
            # straight back to the same queue (~425 times a second, issue 21): refused instead.
            model_id = headers.get(MODEL_HEADER)
            if not is_valid_id(model_id):
                mesh.reject_message("not_a_model_queue")
                _refuse(app, message, ack, consumer, InvalidArgument(
                    f"mesh.infer on {str(routing_key)[:200]!r}, which is not a model queue, needs a valid "
                    f"{MODEL_HEADER} header naming a model served there; send it to its model's queue"))
                return
        signals.task_received.send(sender=consumer, request=req)
        task_reserved(req)
        if send_events:
            req.send_event(
                "task-received",
                name=f"mesh.infer[{model_id}]",
                args=req.argsrepr, kwargs=req.kwargsrepr,
                root_id=req.root_id, parent_id=req.parent_id, retries=0,
                eta=None, expires=req.expires and req.expires.isoformat(),
                model=model_id, vmodel=vmodel if is_valid_id(vmodel := headers.get("mm-vmodel-id")) else None,
            )
        many = kwargs_.get("items") if isinstance(kwargs_, dict) else None
        items = len(many) if isinstance(many, list) and many else 1
        priority = req.delivery_info.get("priority")
        high = isinstance(priority, int) and priority < NORMAL_PRIORITY
        if not mesh.on_request(model_id, req, items=items, high=high, requeue=on_model_queue):
            worker_state.task_ready(req)
            mesh.reject_message("not_a_model_queue")
            _refuse(app, message, ack, consumer, InvalidArgument(
                f"mesh.infer on {str(routing_key)[:200]!r}, which is not a model queue, for model "
                f"{model_id!r}, which is not served there; send it to its model's queue"))

    return _guarded(task, app, consumer, handler)


def _too_large(app: Any, message: Any, ack: Any, consumer: Any, max_bytes: int) -> None:
    """Answer an oversized request with RequestTooLarge without decoding it, then ack it."""
    task_id = _task_id(message.headers)
    size = len(message.body)
    log.error("refusing a %d-byte mesh.infer message %s (limit %d)", size, task_id, max_bytes)
    consumer.mesh.reject_message("malformed")
    if task_id is not None:
        app.backend.mark_as_failure(
            task_id, RequestTooLarge(f"request of {size} bytes exceeds the worker's limit of {max_bytes}"),
            request=_reply_context(task_id, message),
        )
    ack(log, consumer.connection_errors)


def _refuse(app: Any, message: Any, ack: Any, consumer: Any, error: Exception) -> None:
    """Answer an undecodable request with `error` (when it carries an id), then ack it."""
    task_id = _task_id(message.headers)
    log.error("refusing mesh.infer message %r: %s", task_id, error)
    if task_id is not None:
        app.backend.mark_as_failure(task_id, error, request=_reply_context(task_id, message))
    ack(log, consumer.connection_errors)


def _task_id(headers: Any) -> str | None:
    """A message's task id if a result can be stored under it."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if usable_text(task_id) else None


def _reply_context(task_id: str, message: Any) -> Context:
    """What the result backend needs to answer a request Celery could not decode: its id and
    its producer's reply list (mesh/broker/results.py)."""
    props = message.properties if isinstance(message.properties, dict) else {}
    reply_to = props.get("reply_to")
    return Context(id=task_id, reply_to=reply_to if isinstance(reply_to, str) else None)


def refuse_envelope(app: Any, envelope: dict | None, reason: str) -> None:
    """Answer a message the transport dropped (mesh/broker/transport.py `on_rejected`) with
    InvalidArgument, when it is a mesh.infer whose task id is usable: its producer hears
    why rather than wait for a timeout. Other messages (commands, scheduler runs, garbage)
    have nobody waiting."""
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    task_id = _task_id(headers)
    if task_id is None or headers.get("task") != "mesh.infer":
        return
    props = envelope.get("properties") if isinstance(envelope.get("properties"), dict) else {}
    reply_to = props.get("reply_to")
    app.backend.mark_as_failure(
        task_id, InvalidArgument(f"mesh.infer message refused: malformed envelope ({reason})"),
        request=Context(id=task_id, reply_to=reply_to if isinstance(reply_to, str) else None),
    )


def _guarded(task: Any, app: Any, consumer: Any, handler: Any) -> Any:
    """`handler` that never raises: whatever escapes it rejects that message alone (without
    requeue: it would only come back), answered with InvalidArgument when it is a request
    whose id is usable, logged once and counted. A message the handler settled (acked or
    rejected) is left as it is."""
    name = task.name

    def guarded(message, body, ack, reject, callbacks, **kw):
        settled: list[str] = []

        def ack_(*args: Any, **kwargs: Any) -> Any:
            settled.append("ack")
            return ack(*args, **kwargs)

        def reject_(*args: Any, **kwargs: Any) -> Any:
            settled.append("reject")
            return reject(*args, **kwargs)

        def ack_soon() -> None:  # acked with the next moments' others, in one round trip
            settled.append("ack")
            consumer.mesh.consumer.ack_soon(message)

        try:
            handler(message, body, ack_, reject_, callbacks, ack_soon=ack_soon, **kw)
        except Exception as exc:
            log.error("rejecting a %s message that could not be handled: %s: %s",
                      name, type(exc).__name__, str(exc)[:200])  # fmt: skip
            log.debug("handler failure", exc_info=True)
            consumer.mesh.reject_message("unexpected")
            if settled:
                return
            try:
                task_id = _task_id(message.headers) if name == "mesh.infer" else None
                if task_id is not None:
                    app.backend.mark_as_failure(
                        task_id, InvalidArgument(f"{name} message refused: {type(exc).__name__}"),
                        request=_reply_context(task_id, message),
                    )
            except Exception as answer_exc:  # the reject below still happens
                log.error("could not answer a refused %s: %s", name, answer_exc)
            reject(log, consumer.connection_errors, False)

    return guarded


def _from_queue(message: Any) -> object:
    """The queue a message was taken from (the transport sets it, mesh/broker/transport.py)."""
    info = message.delivery_info
    return info.get("routing_key") if isinstance(info, dict) else None


def _refuse_from_elsewhere(task: Any, message: Any, ack: Any, consumer: Any, expected: str) -> bool:
    """Control and command tasks act only from their own queue: a producer whose Redis rights
    are confined to model queues must not reach the control plane through them."""
    queue = _from_queue(message)
    if queue == expected:
        return False
    log.error("dropping a %s taken from queue %r: it is honoured only from %s", task.name, queue, expected)
    ack(log, consumer.connection_errors)
    return True


def control_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any):
    """Scheduler runs (`mesh.rebalance`, `mesh.sync_repository`) go to the worker's control
    thread: a run reads Redis (and may list S3) for a while, and must not stall intake."""
    mesh = consumer.mesh
    own_queue = mesh.keys.control_queue

    def handler(message, body, ack, reject, callbacks, **kw):
        if _refuse_from_elsewhere(task, message, ack, consumer, own_queue):
            return
        try:
            payload = message.payload
            kwargs_ = payload[1] if isinstance(payload, (list, tuple)) and len(payload) > 1 else {}
            if not isinstance(kwargs_, dict):
                raise TypeError(f"keyword arguments must be an object, not {type(kwargs_).__name__}")
            headers = message.headers if isinstance(message.headers, dict) else {}
            expires = headers.get("expires")
            expired = expires is not None and maybe_iso8601(expires) <= datetime.now(timezone.utc)
        except Exception as exc:  # ContentDisallowed, DecodeError, TypeError, RecursionError, ...
            log.error("rejecting a malformed %s: %s: %s", task.name, type(exc).__name__, str(exc)[:200])
            mesh.reject_message("malformed")
            reject(log, consumer.connection_errors, False)
            return
        # acked at once: a run lost with its worker is simply the next tick's work
        ack(log, consumer.connection_errors)
        if expired:
            log.info("dropping an expired %s", task.name)
            return
        mesh.run_control(task.name, task.run, kwargs_)

    return _guarded(task, app, consumer, handler)


def command_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any):
    mesh = consumer.mesh
    own_queue = mesh.keys.worker_queue(consumer.hostname)

    def handler(message, body, ack, reject, callbacks, ack_soon, **kw):
        if _refuse_from_elsewhere(task, message, ack, consumer, own_queue):
            return
        # Commands are acked at once (with the others of the next moments: `ack_soon`): they
        # are idempotent, and a worker that dies before acting on one is noticed by its
        # missing heartbeat (the load claim is taken over).
        try:
            payload = message.payload
            kwargs_ = payload[1] if isinstance(payload, (list, tuple)) and len(payload) > 1 else None
            cmd = Command.model_validate(kwargs_)
        except Exception as exc:  # ValidationError, DecodeError, RecursionError, ...
            log.error("rejecting a malformed mesh.command: %s: %s", type(exc).__name__, str(exc)[:200])
            mesh.reject_message("malformed")
            reject(log, consumer.connection_errors, False)
            return
        ack_soon()
        mesh.on_command(cmd)

    return _guarded(task, app, consumer, handler)


__all__ = ["infer_strategy", "command_strategy", "control_strategy", "refuse_envelope", "Request"]
