"""Celery's Redis result backend, made to outlive a Redis outage of any length.

Producers wait for results on a pub/sub subscription (Celery's celery/backends/redis.py
`ResultConsumer`). When Redis goes
away, Celery 5.7's result consumer retries for a few seconds, then gives up ("the Celery
application must be restarted") and is left without a subscription: every result still
pending in that process then arrives only when its `get()` times out, even after Redis is
back. Here a consumer that lost its connection simply tries again at its next drain or
subscription: once Redis answers it fetches what completed meanwhile and subscribes to
everything still pending, so `get()` returns as soon as the answer exists. Commands are also
retried through a short outage (workers store results through this backend too). Celery uses
it through `result_backend` (mesh/broker/celery_options.py).

It also pushes a final result to its producer's reply list when the request names one
(mesh/broker/replies.py): Celery stores a mesh request's result through here when the worker
refuses, revokes or expires it; answered requests are stored by the worker's results
pipeline, which pushes the same way (`push_reply`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any

import orjson
import redis
from celery import states

from celery.backends.redis import RedisBackend as _RedisBackend
from celery.backends.redis import ResultConsumer as _ResultConsumer
from celery.backends.redis import SentinelBackend as _SentinelBackend
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mesh.broker.redis_url import FollowingConnection, is_sentinel
from mesh.protocol.keys import Keys
from mesh.protocol.messages import REPLY_TTL_S

log = logging.getLogger("mesh.broker.results")

BACKEND = "mesh.broker.results:RedisBackend"
SENTINEL_BACKEND = "mesh.broker.results:SentinelBackend"
RETRY_PAUSE_S = 0.25  # between reconnection attempts of a waiting get()
COMMAND_RETRIES = 32  # x up to 0.5 s: ~15 s


class ResultConsumer(_ResultConsumer):
    @contextmanager
    def reconnect_on_error(self):
        try:
            yield
        except TimeoutError:  # a polling timeout, not a connection error
            raise
        except self._connection_errors as exc:
            try:
                self._reconnect()
            except self._connection_errors:
                # still away: stay unsubscribed; the next drain or subscription tries again
                log.warning("result store unreachable (%s); waiting results reconnect when it is back", exc)
                self._pubsub = None

    def _heal(self) -> bool:
        """One reconnection attempt when pending results have no subscription."""
        with self._locked():
            if self._pubsub is not None or not self.subscribed_to:
                return True
            try:
                self._reconnect_pubsub()  # fetches what completed meanwhile, re-subscribes
                return True
            except self._connection_errors:
                self._pubsub = None
                return False

    def drain_events(self, timeout=None):
        if self._pubsub is None and self.subscribed_to and not self._heal():
            time.sleep(min(timeout or RETRY_PAUSE_S, RETRY_PAUSE_S))
            return None
        return super().drain_events(timeout)

    def consume_from(self, task_id):
        self._heal()
        return super().consume_from(task_id)


class RedisBackend(_RedisBackend):
    ResultConsumer = ResultConsumer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Celery's pool has no retries at all: a restart, a failover or Redis still loading
        # its data ("LOADING") would fail the batch whose results are being stored. Each
        # command is retried for ~15 s instead.
        self.connparams.setdefault("retry", Retry(ExponentialBackoff(cap=0.5, base=0.02), COMMAND_RETRIES))
        prefix = self.app.conf.get("mesh_prefix")
        self._keys = Keys(prefix) if prefix else None
        self._reply = threading.local()
        # whether `success_record` may write this backend's records (JSON, without the
        # extended fields, which it does not write)
        self.plain_json_records = (
            self.serializer == "json" and not self.app.conf.find_value_for_key("extended", "result")
        )

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        reply_to = getattr(request, "reply_to", None)
        wanted = state in states.READY_STATES and self._keys is not None and self._keys.is_reply_list(reply_to)
        self._reply.to = reply_to if wanted else None
        try:
            return super()._store_result(task_id, result, state, traceback, request=request, **kwargs)
        finally:
            self._reply.to = None

    def _set(self, key, value, expires=None):
        super()._set(key, value, expires)
        reply_to = getattr(self._reply, "to", None)
        if reply_to:
            with self.client.pipeline(transaction=False) as pipe:
                push_reply(pipe, reply_to, value)
                check_replies(pipe.execute(raise_on_error=False))


class SentinelBackend(RedisBackend, _SentinelBackend):
    """The same backend on a Sentinel-managed master (Celery's SentinelBackend: its URL
    parsing and its pool from `Sentinel.master_for`, the master named by the `master_name`
    result-backend transport option). A connection error ends with the pool asking the
    sentinels again, so the command retries above reach the new master after a failover."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "connection_class" not in self.connparams:  # TLS keeps Celery's SSL class
            self.connparams["connection_class"] = FollowingConnection


def success_record(backend: Any, result: Any, task_id: str, request: Any, date_done: str) -> bytes | None:
    """The record Celery's backend stores for a SUCCESS `result` (`_get_result_meta`, the
    `task_id` the Redis backend adds, `encode`), written with orjson: the worker's results
    thread spent ~70 us of a 32-item micro-batch's ~100 us of encoding in Celery's meta and
    the standard library's encoder. The same JSON values, or None where they would not be:
    a backend that stores extended results or not as JSON, a request of a group or with a
    parent (Celery adds fields for them), a result orjson refuses (integers beyond 64 bits, a
    lone surrogate) or writes with a `null` (how it writes NaN, a legal tensor value); then
    Celery's way. `date_done`: `backend.app.now().isoformat()`, as Celery takes it."""
    if (not getattr(backend, "plain_json_records", False) or getattr(request, "group", None)
            or getattr(request, "parent_id", None)):  # fmt: skip
        return None
    try:
        body = orjson.dumps(result)
        tail = orjson.dumps(date_done) + b',"task_id":' + orjson.dumps(task_id) + b"}"
    except TypeError:  # orjson.JSONEncodeError
        return None
    if b"null" in body:
        return None
    return b'{"status":"SUCCESS","result":' + body + b',"traceback":null,"children":[],"date_done":' + tail


def push_reply(pipe: Any, reply_to: str, *values: Any) -> None:
    """Queue on `pipe` the push of stored result records to their producer's reply list."""
    pipe.rpush(reply_to, *values)
    pipe.expire(reply_to, REPLY_TTL_S)


def check_replies(outcomes: list) -> None:
    """Log reply pushes that failed (a key of another type where a reply list should be): the
    result itself is stored, so its producer still finds it (mesh/broker/replies.py sweeps)."""
    for outcome in outcomes:
        if isinstance(outcome, redis.ResponseError):
            log.warning("could not push a result to its producer's reply list: %s", outcome)
            return


def backend_setting(url: str) -> str:
    """The `result_backend` value naming this class for a Redis URL (Celery's `cls+url` form)."""
    return f"{SENTINEL_BACKEND if is_sentinel(url) else BACKEND}+{url}"
