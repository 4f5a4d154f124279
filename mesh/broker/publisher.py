"""Publishing `mesh.infer`: the message a Celery producer would send, in one Redis round trip.

Through `app.send_task`, a message costs the producer about 0.3 ms of CPU before it reaches
the socket: Celery's router and message builder, kombu's Producer, its serializer registry,
the virtual transport's exchange lookup, a base64 body, then a pipeline of LPUSH and the bell
(docs/benchmarks.md, "Per-request cost"). A `mesh.infer` message always has the same shape:
Celery's task protocol 2 (https://docs.celeryq.dev/en/stable/internals/protocol.html) inside
kombu's Redis envelope (kombu/transport/virtual/base.py `Channel.prepare_message` and
`basic_publish`, kombu/transport/redis.py `_put`). Built here with json and pushed with its
queue's bell by one script call, it is that message: plain Celery workers, Flower and
`celery inspect` read it unchanged.

The one liberty: the body is the JSON text itself, without kombu's base64 layer (kombu decodes a
body only when `properties.body_encoding` names a codec, `Channel.decode_body`), which spares
both the producer and the worker a base64 pass over every tensor.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from typing import Any
from uuid import uuid4

import redis

from mesh.protocol.keys import BELL_TTL_MS, Keys
from mesh.protocol.messages import INFER_TASK

# The message onto its queue's list and its bell rung (mesh/broker/transport.py `ring`), as
# one atomic step: a consumer woken by the bell always finds the message.
PUSH_AND_RING = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""

# Celery's canvas fields of a task without callbacks, chain or chord (protocol 2 `embed`).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOST = socket.gethostname()


class InferPublisher:
    """Sends `mesh.infer` messages to model queues on the broker's Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._push = client.register_script(PUSH_AND_RING)

    def publish(
        self,
        task_id: str,
        queue: str,
        kwargs: dict[str, Any],
        *,
        priority: int,
        headers: dict[str, Any],
        shadow: str,
        reply_to: str,
        expires_at: float | None = None,
    ) -> None:
        """Put request `task_id` on `queue` (a model queue) at `priority` (a kombu priority
        step). `expires_at` (epoch seconds): the worker drops it after that."""
        message = infer_message(
            task_id, queue, kwargs, priority=priority, headers=headers, shadow=shadow,
            reply_to=reply_to, expires_at=expires_at,
        )  # fmt: skip
        self._push(keys=[self.keys.queue_list_key(queue, priority), self.keys.queue_bell(queue)],
                   args=[message, BELL_TTL_MS])  # fmt: skip


def infer_message(
    task_id: str,
    queue: str,
    kwargs: dict[str, Any],
    *,
    priority: int,
    headers: dict[str, Any],
    shadow: str,
    reply_to: str,
    expires_at: float | None,
) -> str:
    """The kombu Redis envelope of a protocol-2 `mesh.infer` message, as JSON text."""
    expires = None
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": priority,
        "delivery_tag": str(uuid4()),
    }
    if expires_at is not None:
        expires = datetime.fromtimestamp(expires_at, timezone.utc).isoformat()
        # what Celery sets for AMQP brokers (milliseconds left); kombu's Redis ignores it
        properties["expiration"] = str(max(0, int((expires_at - datetime.now(timezone.utc).timestamp()) * 1000)))
    envelope = {
        "body": json.dumps([[], kwargs, _EMBED]),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": INFER_TASK,
            "id": task_id,
            "shadow": shadow,
            "eta": None,
            "expires": expires,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": kwargs_repr(kwargs),
            "origin": f"gen{os.getpid()}@{_HOST}",
            "ignore_result": None,  # not set by the producer: the task's own setting applies
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            **headers,
        },
        "properties": properties,
    }
    return json.dumps(envelope)


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """What Flower shows as the request's arguments: each input's name, type and shape.

    Celery's `saferepr` of the whole payload walks every tensor value to print a few of them,
    a cost per request that grows with the tensors; a request is better described by shapes.
    """
    items = kwargs.get("items")
    if isinstance(items, list):
        return f"{{'items': <{len(items)} requests>}}"
    tensors = kwargs.get("inputs") or []
    described = ", ".join(
        f"{t.get('name')} {t.get('datatype')}{t.get('shape')}" if isinstance(t, dict) else "?" for t in tensors
    )
    return f"{{'inputs': [{described}]}}"


__all__ = ["InferPublisher", "infer_message", "kwargs_repr", "PUSH_AND_RING"]
