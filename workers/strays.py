"""The stray sweep: requests queued for a model that is no longer registered are answered
NOT_FOUND, whoever put them there and whenever (mesh/store/strays.py says how they arise).

One worker of the pool sweeps per `MESH_STRAY_SWEEP_INTERVAL_S` (a lock in Redis, taken by
whichever worker's heartbeat gets there first), on the worker's control thread: answering a
long queue must not delay the heartbeat. A request is answered the way the worker answers one
it cannot decode (workers/strategy.py `_refuse`): a typed failure stored through the result
backend, which pushes it to the producer's reply list (mesh/broker/results.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import redis
from celery.app.task import Context

from mesh.errors import ModelNotFound
from mesh.protocol.ids import is_valid_id
from mesh.store.strays import StrayStore

log = logging.getLogger("mesh.worker.strays")


class StrayRequest(NamedTuple):
    task_id: str
    reply_to: str | None
    model_id: str


def stray_request(raw: bytes, model_from_queue: Callable[[str], str | None]) -> StrayRequest | None:
    """The id, reply address and model of a queued kombu envelope; None when it carries no
    usable task id (nothing could be told: it is dropped)."""
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
        properties = message.get("properties") or {}
        task_id = headers.get("id")
        if not isinstance(task_id, str) or not task_id:
            return None
        task_id.encode()  # a lone surrogate cannot be stored: dropped, not answered
        reply_to = properties.get("reply_to")
        routing_key = (properties.get("delivery_info") or {}).get("routing_key")
        model_id = (model_from_queue(routing_key) if isinstance(routing_key, str) else None) or headers.get(
            "mm-model-id"
        )
        return StrayRequest(
            task_id,
            reply_to if isinstance(reply_to, str) else None,
            model_id if isinstance(model_id, str) else "?",
        )
    except (ValueError, TypeError, AttributeError, RecursionError, UnicodeError):
        return None


class StraySweeper:
    def __init__(
        self,
        store: StrayStore,
        backend: Callable[[], Any],
        token: str,
        interval_s: float,
        grace_s: float,
        scan_keys: int,
        reroute: Callable[[str], object] = lambda model_id: None,
    ) -> None:
        self.store = store
        self.reroute = reroute  # requests of a vmodel go to its active model, not NOT_FOUND
        self.backend = backend
        self.token = token
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.scan_keys = scan_keys

    def sweep(self) -> int:
        """One sweep if this worker gets the lock; returns the requests answered."""
        if not self.store.acquire(self.token, self.interval_s):
            return 0
        candidates = self.store.candidates(self.scan_keys)
        # only a gone model's entry depends on the unacked messages; their values can be large
        unacked = self.store.unacked_queues() if self.store.watching_gone() else set()
        for model_id, lists in candidates.items():
            try:
                if is_valid_id(model_id):  # not a name that decodes to no id
                    self.reroute(model_id)
            except redis.RedisError:
                raise
            except Exception as exc:  # ids as found in Redis: any of them may be unusable
                log.warning("rerouting the vmodel requests of %r failed: %s", model_id, exc)
            queue = self.store.keys.queue_of_found(model_id)
            taken = self.store.take_if_stray(model_id, lists, self.grace_s, unacked=queue in unacked)
            if taken > 0:
                log.warning("%d request(s) queued for %r, which is not registered: answering NOT_FOUND",
                            taken, model_id if is_valid_id(model_id) else queue)  # fmt: skip
        return self.store.answer_held(self.token, self.answer, self.interval_s)

    def answer(self, raw: bytes) -> None:
        req = stray_request(raw, self.store.keys.model_from_queue)
        if req is None:
            log.error("dropping a queued message of an unregistered model: it has no usable task id")
            return
        error = ModelNotFound(f"model {req.model_id!r} is not registered (it was unregistered or auto-deleted)")
        try:
            self.backend().mark_as_failure(req.task_id, error, request=Context(id=req.task_id, reply_to=req.reply_to))
        except redis.RedisError:
            raise  # ends the sweep: the rest stay held for the next one
        except Exception as exc:  # this message's own (an id or address the backend refuses)
            log.error("could not answer %r (%s): dropped", req.task_id, exc)
