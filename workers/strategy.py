"""Strategies: what the consumer thread does with each `mesh.infer` / `mesh.command` message.

Celery calls a task's Strategy once per consumer start to build the message handler
(celery/worker/consumer/consumer.py `Consumer.update_strategies`, celery/app/task.py
`Task.start_strategy`). Ours keeps what Celery's default strategy (celery/worker/strategy.py
`default`) does for bookkeeping
(revoked/expired check, task_reserved, the task-received event) and then, instead of
executing through the pool, appends the request to its model's buffer. Nothing here blocks:
the inference thread and the model manager do the work.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from celery import signals
from celery.app.task import Context
from celery.exceptions import InvalidTaskError
from celery.utils.time import maybe_iso8601
from celery.worker.request import Request, create_request_cls
from celery.worker.state import task_reserved
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.imports import symbol_by_name
from pydantic import ValidationError

from mesh.errors import InvalidArgument, RequestTooLarge
from mesh.models import Command
from mesh.protocol.messages import PRIORITIES

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
            _refuse(app, message, ack, consumer, InvalidArgument(f"mesh.infer message refused: {exc}"))
            return
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            # Celery rejects InvalidTaskError with a logged reason; anything else would
            # escape into the event loop
            raise InvalidTaskError(f"malformed mesh.infer message: {type(exc).__name__}: {exc}") from exc
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            return
        # the queue a message came from is authoritative: it is the concrete model
        routing_key = (message.delivery_info or {}).get("routing_key") or ""
        model_id = model_from_queue(routing_key) or message.headers.get("mm-model-id")
        signals.task_received.send(sender=consumer, request=req)
        task_reserved(req)
        if send_events:
            req.send_event(
                "task-received",
                name=f"mesh.infer[{model_id}]",
                args=req.argsrepr, kwargs=req.kwargsrepr,
                root_id=req.root_id, parent_id=req.parent_id, retries=0,
                eta=None, expires=req.expires and req.expires.isoformat(),
                model=model_id, vmodel=message.headers.get("mm-vmodel-id"),
            )
        many = kwargs_.get("items") if isinstance(kwargs_, dict) else None
        items = len(many) if isinstance(many, list) and many else 1
        priority = req.delivery_info.get("priority")
        mesh.on_request(model_id, req, items=items, high=priority is not None and priority < NORMAL_PRIORITY)

    return handler


def _too_large(app: Any, message: Any, ack: Any, consumer: Any, max_bytes: int) -> None:
    """Answer an oversized request with RequestTooLarge without decoding it, then ack it."""
    task_id = (message.headers or {}).get("id")
    size = len(message.body)
    log.error("refusing a %d-byte mesh.infer message %s (limit %d)", size, task_id, max_bytes)
    if task_id:
        app.backend.mark_as_failure(
            task_id, RequestTooLarge(f"request of {size} bytes exceeds the worker's limit of {max_bytes}"),
            request=_reply_context(task_id, message),
        )
    ack(log, consumer.connection_errors)


def _refuse(app: Any, message: Any, ack: Any, consumer: Any, error: Exception) -> None:
    """Answer an undecodable request with `error` (when it carries an id), then ack it."""
    task_id = (message.headers or {}).get("id")
    log.error("refusing mesh.infer message %r: %s", task_id, error)
    if isinstance(task_id, str) and task_id:
        app.backend.mark_as_failure(task_id, error, request=_reply_context(task_id, message))
    ack(log, consumer.connection_errors)


def _reply_context(task_id: str, message: Any) -> Context:
    """What the result backend needs to answer a request Celery could not decode: its id and
    its producer's reply list (mesh/broker/results.py)."""
    return Context(id=task_id, reply_to=(message.properties or {}).get("reply_to"))


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
            expires = (message.headers or {}).get("expires")
            expired = expires is not None and maybe_iso8601(expires) <= datetime.now(timezone.utc)
        except (ContentDisallowed, DecodeError, TypeError, ValueError) as exc:
            log.error("rejecting a malformed %s: %s", task.name, exc)
            reject(log, consumer.connection_errors, False)
            return
        # acked at once: a run lost with its worker is simply the next tick's work
        ack(log, consumer.connection_errors)
        if expired:
            log.info("dropping an expired %s", task.name)
            return
        mesh.run_control(task.name, task.run, kwargs_)

    return handler


def command_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any):
    mesh = consumer.mesh
    own_queue = mesh.keys.worker_queue(consumer.hostname)

    def handler(message, body, ack, reject, callbacks, **kw):
        if _refuse_from_elsewhere(task, message, ack, consumer, own_queue):
            return
        # Commands are acked at once: they are idempotent, and a worker that dies before
        # acting on one is noticed by its missing heartbeat (the load claim is taken over).
        try:
            payload = message.payload
            kwargs_ = payload[1] if isinstance(payload, (list, tuple)) and len(payload) > 1 else None
            cmd = Command.model_validate(kwargs_)
        except (ValidationError, TypeError, ValueError) as exc:
            log.error("rejecting a malformed mesh.command: %s", exc)
            reject(log, consumer.connection_errors, False)
            return
        ack(log, consumer.connection_errors)
        mesh.on_command(cmd)

    return handler


__all__ = ["infer_strategy", "command_strategy", "Request"]
