"""Publishing mesh's tasks: the message a Celery producer would send, in one Redis round trip.

Through `app.send_task`, a message costs the producer about 0.3 ms of CPU before it reaches
the socket: Celery's router and message builder, kombu's Producer, its serializer registry,
the virtual transport's exchange lookup, a base64 body, then a pipeline of LPUSH and the bell
(docs/benchmarks.md, "Per-request cost"). A `mesh.infer` request, like a `mesh.command` to a
worker's private queue, always has the same shape:
Celery's task protocol 2 (https://docs.celeryq.dev/en/stable/internals/protocol.html) inside
kombu's Redis envelope (kombu/transport/virtual/base.py `Channel.prepare_message` and
`basic_publish`, kombu/transport/redis.py `_put`). Built here as JSON (orjson where it writes the same
values, mesh/protocol/jsonwire.py) and pushed with its
queue's bell by one script call, it is that message: plain Celery workers, Flower and
`celery inspect` read it unchanged. An asyncio producer's sends of one loop turn share one
call (`Outbox`).

The one liberty: the body is the JSON text itself, without kombu's base64 layer (kombu decodes a
body only when `properties.body_encoding` names a codec, `Channel.decode_body`), which spares
both the producer and the worker a base64 pass over every tensor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple
from uuid import uuid4

import orjson
import redis
from celery import signals
from celery.utils.saferepr import saferepr

from mesh.protocol import jsonwire
from mesh.protocol.keys import AS_LIST_LUA, BELL_TTL_MS, Keys
from mesh.protocol.messages import COMMAND_TASK, INFER_TASK

# Each message onto its queue's list and the queue's bell rung (mesh/broker/transport.py
# `ring`), as one atomic step: a consumer woken by the bell always finds the message. KEYS are
# pairs (list, bell); ARGV[1] the bell's TTL, ARGV[2] the sizes of the sends the call carries
# (space-separated), then one message per pair. A send's messages (a load command, then its
# request) go in order and stop at the first that fails; the sends are independent of each
# other. An asyncio loop's sends of one turn share a call (`Outbox`): with `redis.call` one
# refused message stopped the whole call, and the sends before it were on their queues while
# their callers got its error. Returns {one outcome per send (1, or the error of its failed
# message), {key, type} of each key replaced}.
# A queue's list or bell that holds another type (any producer may write them) is replaced
# (`AS_LIST_LUA`, as the scripts that put messages back do: docs/reliability.md, findings 9
# and 10): a string where a model's list goes made every request to that model fail until an
# operator deleted it, and a bell that is not a list failed the push after its message was on
# the list. Nothing of a queue is lost: its messages are only ever in lists. Only a refused
# LPUSH pays the type check.
PUSH_AND_RING = AS_LIST_LUA + """
local outcomes, replaced, i = {}, {}, 1
for size in string.gmatch(ARGV[2], '%d+') do
  local outcome = 1
  for _ = 1, tonumber(size) do
    if outcome == 1 then
      local message = ARGV[(i + 1) / 2 + 2]
      local pushed = redis.pcall('LPUSH', KEYS[i], message)
      if type(pushed) == 'table' and pushed.err and string.sub(pushed.err, 1, 9) == 'WRONGTYPE' then
        replaced[#replaced + 1] = {KEYS[i], as_list(KEYS[i])}
        pushed = redis.pcall('LPUSH', KEYS[i], message)
      end
      if type(pushed) == 'table' and pushed.err then
        outcome = pushed
      else
        local rung = redis.pcall('LPUSH', KEYS[i + 1], 1)
        if type(rung) == 'table' and rung.err then
          local kind = as_list(KEYS[i + 1])
          if kind then replaced[#replaced + 1] = {KEYS[i + 1], kind} end
          redis.call('LPUSH', KEYS[i + 1], 1)
        end
        redis.call('LTRIM', KEYS[i + 1], 0, 0)
        redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
      end
    end
    i = i + 2
  end
  outcomes[#outcomes + 1] = outcome
end
return {outcomes, replaced}
"""
PUSH_MAX = 256  # messages per script call: keeps one call short for the server

log = logging.getLogger(__name__)

# Celery's canvas fields of a task without callbacks, chain or chord (protocol 2 `embed`).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_EMBED_JSON = json.dumps(_EMBED)
_HOST = socket.gethostname()


class Prepared(NamedTuple):
    """A message ready to push: its queue's list (at its priority), the queue's bell, the JSON,
    the size of its body (the request's JSON: what MESH_MAX_REQUEST_BYTES bounds), and what
    Celery's `after_task_publish` receivers are given."""

    list_key: str
    bell_key: str
    message: str
    body_size: int = 0
    queue: str = ""
    headers: dict | None = None
    kwargs: dict | None = None
    task: str = INFER_TASK


class InferPublisher:
    """Sends `mesh.infer` messages to model queues, and `mesh.command` messages to workers'
    queues, on the broker's Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._push = client.register_script(PUSH_AND_RING)

    def prepare(
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
    ) -> Prepared:
        """Request `task_id` for `queue` (a model queue) at `priority` (a kombu priority step).
        `expires_at` (epoch seconds): the worker drops it after that."""
        message, body_size, all_headers = infer_message(
            task_id, queue, kwargs, priority=priority, headers=headers, shadow=shadow,
            reply_to=reply_to, expires_at=expires_at,
        )  # fmt: skip
        return Prepared(self.keys.queue_list_key(queue, priority), self.keys.queue_bell(queue), message,
                        body_size, queue, all_headers, kwargs)  # fmt: skip

    def prepare_command(self, queue: str, kwargs: dict[str, Any]) -> Prepared:
        """A `mesh.command` for `queue` (a worker's private queue), as `app.send_task(COMMAND_TASK,
        kwargs=..., queue=..., ignore_result=True, priority=0)` sends it: priority 0, so it
        overtakes the requests waiting in the same worker's lists."""
        task_id = str(uuid4())
        message, body_size, all_headers = task_message(
            COMMAND_TASK, task_id, queue, kwargs, priority=0, headers={}, shadow=None, reply_to="",
            expires_at=None, ignore_result=True,
        )  # fmt: skip
        return Prepared(self.keys.queue_list_key(queue, 0), self.keys.queue_bell(queue), message,
                        body_size, queue, all_headers, kwargs, COMMAND_TASK)  # fmt: skip

    def push(self, prepared: Sequence[Prepared]) -> None:
        """Push messages in order and ring their bells, as one send: the first message that
        fails raises its error, and the ones after it are not pushed."""
        (error,) = self.push_sends([prepared])
        if error is not None:
            raise error

    def push_sends(self, sends: Sequence[Sequence[Prepared]]) -> list[BaseException | None]:
        """Push several sends (each a list of messages, as `push` takes) in one round trip per
        PUSH_MAX messages: each send's outcome, None or the error of its message that failed (a
        Redis error of the call itself, a lost connection, raises: then nothing is known)."""
        outcomes: list[BaseException | None] = []
        chunk: list[Sequence[Prepared]] = []
        size = 0
        for send in sends:
            if chunk and size + len(send) > PUSH_MAX:
                outcomes += self._push_chunk(chunk)
                chunk, size = [], 0
            chunk.append(send)
            size += len(send)
        if chunk:
            outcomes += self._push_chunk(chunk)
        return outcomes

    def _push_chunk(self, sends: list[Sequence[Prepared]]) -> list[BaseException | None]:
        keys = [k for send in sends for p in send for k in (p.list_key, p.bell_key)]
        messages = [p.message for send in sends for p in send]
        sizes = " ".join(str(len(send)) for send in sends)
        try:
            replies, replaced = self._push(keys=keys, args=[BELL_TTL_MS, sizes, *messages])
        except redis.exceptions.NoPermissionError as exc:
            # Redis 7 checks a script's declared keys before it runs: one key this producer's
            # user may not write (a worker's queue, for a cold request's load command) refuses
            # the whole call, and nothing ran. Each send again on its own, so that only the
            # sends naming such a key fail.
            if len(sends) == 1:
                return [exc]
            return [outcome for send in sends for outcome in self._push_chunk([send])]
        for key, kind in replaced:
            log.error("replaced %s: it held a %s, not a list (another writer put it there)",
                      key.decode("utf-8", "replace"), kind.decode("utf-8", "replace"))  # fmt: skip
        outcomes = [reply if isinstance(reply, BaseException) else None for reply in replies]
        if signals.after_task_publish.receivers:
            for send, error in zip(sends, outcomes):
                for p in send if error is None else ():
                    signals.after_task_publish.send(sender=p.task, body=([], p.kwargs, _EMBED),
                                                    headers=p.headers, exchange="", routing_key=p.queue)  # fmt: skip
        return outcomes

    def publish(self, task_id: str, queue: str, kwargs: dict[str, Any], **options: Any) -> None:
        """`prepare` and `push` one message."""
        self.push([self.prepare(task_id, queue, kwargs, **options)])


class Outbox:
    """The messages an asyncio loop sends in one turn, pushed together at the end of the turn.

    A loop with many requests in flight wakes many of them per turn (one reply drain resolves
    them all), and each sends its next request: pushed one by one, every send would block the
    loop for a round trip. Here the first send of a turn schedules one push for the turn's
    end; each send returns a future that the push resolves with that send's own outcome (its
    error, when its queue refused it; every send's, when the call itself failed).
    """

    def __init__(self, push_sends: Callable[[Sequence[Sequence[Prepared]]], list[BaseException | None]]) -> None:
        self._push_sends = push_sends
        self._turns: dict[asyncio.AbstractEventLoop, tuple[list[Sequence[Prepared]], list[asyncio.Future]]] = {}

    def send(self, *prepared: Prepared) -> asyncio.Future:
        """A future for the push of `prepared` (pushed in this order, as one send)."""
        loop = asyncio.get_running_loop()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = ([], [])
            loop.call_soon(self._flush, loop)
        future = loop.create_future()
        turn[0].append(prepared)
        turn[1].append(future)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        sends, futures = self._turns.pop(loop)
        try:
            outcomes = self._push_sends(sends)
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, error in zip(futures, outcomes):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


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
) -> tuple[str, int, dict[str, Any]]:
    """The kombu Redis envelope of a protocol-2 `mesh.infer` message as JSON text, the size of
    its body, and its headers."""
    return task_message(INFER_TASK, task_id, queue, kwargs, priority=priority, headers=headers, shadow=shadow,
                        reply_to=reply_to, expires_at=expires_at)  # fmt: skip


def task_message(
    task: str,
    task_id: str,
    queue: str,
    kwargs: dict[str, Any],
    *,
    priority: int,
    headers: dict[str, Any],
    shadow: str | None,
    reply_to: str,
    expires_at: float | None,
    ignore_result: bool | None = None,
) -> tuple[str, int, dict[str, Any]]:
    """The kombu Redis envelope of a protocol-2 message of `task` (keyword arguments only) as
    JSON text, the size of its body, and its headers. `ignore_result`: what `send_task`'s
    option of that name puts in the headers (None: the task's own setting applies).

    Celery's `before_task_publish` receivers run first, as for `send_task`, and may change the
    headers and properties (tracing libraries add their context there)."""
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
    all_headers = {
        "lang": "py",
        "task": task,
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
        "kwargsrepr": kwargs_repr(kwargs) if task == INFER_TASK else _short_repr(kwargs),
        "origin": f"gen{os.getpid()}@{_HOST}",
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        **headers,
    }
    receivers = bool(signals.before_task_publish.receivers)
    if receivers:
        signals.before_task_publish.send(
            sender=task, body=([], kwargs, _EMBED), exchange="", routing_key=queue, declare=[],
            headers=all_headers, properties=properties, retry_policy=None,
        )  # fmt: skip
    # Celery's protocol-2 body `[args, kwargs, embed]`; the tensors, in kwargs, take orjson's
    # fast path (mesh/protocol/jsonwire.py), the rest is a constant
    body = f"[[],{jsonwire.dumps(kwargs)},{_EMBED_JSON}]"
    envelope = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": all_headers,
        "properties": properties,
    }
    if not receivers:  # else their headers may hold anything (NaN): the standard library writes them
        try:
            return orjson.dumps(envelope).decode("utf-8"), len(body), all_headers
        except TypeError:  # orjson.JSONEncodeError: what it cannot write exactly
            pass
    return json.dumps(envelope), len(body), all_headers


def _short_repr(kwargs: dict[str, Any]) -> str:
    """Celery's `saferepr(kwargs, 1024)` for flat keyword arguments of scalars (a command's):
    the builtin repr, cut as saferepr cuts, at a tenth of its cost."""
    if all(v is None or type(v) in (str, int, float, bool) for v in kwargs.values()):
        text = repr(kwargs)
        return text if len(text) <= 1024 else text[:1021] + "..."
    return saferepr(kwargs, 1024)


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


__all__ = ["InferPublisher", "Outbox", "Prepared", "infer_message", "kwargs_repr", "task_message", "PUSH_AND_RING"]
