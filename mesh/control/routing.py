"""Routing: from a model or vmodel id to the concrete model's queue, with the cold path.

Used by MeshClient.infer and, as a Celery router (`task_routes` in celeryconfig.py), by any
producer that sends `mesh.infer` with an `mm-model-id` / `mm-vmodel-id` header or a
`model_id` / `vmodel_id` keyword argument. Unknown ids raise ModelNotFound at enqueue time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from cachetools import TLRUCache, TTLCache
from celery import Celery

from mesh.broker.publisher import InferPublisher, Prepared
from mesh.control.commands import command_message, send_command
from mesh.errors import InvalidArgument, ModelLoadFailed, ModelNotFound, QueueFull
from mesh.models import Command
from mesh.policy.precedence import EffectiveConfig, effective_config, record_manifest
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.protocol.messages import INFER_TASK, MODEL_HEADER, PRIORITIES, SERVING_TTL_S, VMODEL_HEADER
from mesh.store.context import StoreContext, is_permission_error
from mesh.store.state import Route, Routed, StateStore
from mesh.store.vmodels import VModelStore

log = logging.getLogger("mesh.control.routing")

CONFIG_TTL_S = 2.0
NO_WORKER_WARN_S = 30.0
# A copy is remembered as serving for a part of the time it has been LOADED, up to
# SERVING_TTL_S (`serving_memory_s`). Under churn a worker evicts a rarely used model tens of
# milliseconds after loading it (closedloop zipf: median copy life 21 ms, 3 % of evicted copies
# older than 1 s); remembered for a full SERVING_TTL_S, the requests of the next second went to
# a queue nobody consumed, until the worker's orphan watch found them (1.5 % of the requests,
# 90-100 ms each). Remembering only copies LOADED for 2 s or more fixed that, but made every
# request of the first 2 s after a load pay the route script: a round trip, ~10 % of a cheap
# request (closedloop svc1: 946 route calls in that window). A copy that has lasted a while
# tends to last a fraction as long again: remembered that long, a young copy is routed a few
# dozen times while it settles, and a copy that leaves early is rarely remembered past its
# leaving.
YOUNG_COPY_FRACTION = 0.25
# How long a vmodel's active model is remembered: a request through a vmodel then costs no read
# of the vmodel's record (one round trip of a warm request's two). Safe because it is shorter
# than the drain's grace (DRAIN_GRACE_S in mesh/control/vmodels.py, 1 s; a test ties the two):
# a producer that read the old active up to this long before a switch sends within the window
# in which the old model's copies stay and answer, and what reaches the old model's queue after
# that moves to the new active (docs/vmodels.md, "Auto-delete and draining"). Other producers
# see a switch up to this late; the client that makes a change sees it at once (`forget_vmodel`).
VMODEL_TTL_S = 0.5


_UNCACHED = object()


def serving_memory_s(loaded_for: float) -> float:
    """How long a producer may send to a model's queue without routing, having seen a live
    copy that has been LOADED for `loaded_for` seconds (see YOUNG_COPY_FRACTION)."""
    return min(SERVING_TTL_S, YOUNG_COPY_FRACTION * loaded_for)


def _until(_key: str, expires: float, _now: float) -> float:
    return expires  # `_serving` holds each model's own expiry (TLRUCache's time-to-use)


class Router:
    def __init__(self, app: Celery, store: StateStore) -> None:
        self.app = app
        self.store = store
        self.vmodel_records = VModelStore(store)
        self.keys: Keys = store.keys
        self._publisher = InferPublisher(store.r, store.keys)
        self.name = f"client:{socket.gethostname()}:{os.getpid()}"
        self.priority_steps = list(app.conf.broker_transport_options.get("priority_steps", [0]))
        self._configs: TTLCache = TTLCache(maxsize=10_000, ttl=CONFIG_TTL_S)
        self._config_lock = threading.Lock()
        self._warned: dict[str, float] = {}
        # Whether this producer places loads itself (claims, copy records, load commands). A
        # producer whose Redis user may not (docs/security.md, "Redis ACLs") finds out at its
        # first cold request and from then on asks the workers to (StateStore.want_load).
        self._places_loads = True
        # Models seen with a live copy skip the route script for a while (`serving_memory_s`;
        # it is 0.3 ms of a 2 ms request). Safe: a request that still reaches a model
        # unregistered meanwhile is answered NOT_FOUND by the worker draining its queue, and one
        # whose copy just left is picked up by that worker's orphan watch. Queue limits are
        # always checked.
        self._clock = time.monotonic  # what `_serving` expires by (a test moves it by hand)
        self._serving: TLRUCache = TLRUCache(maxsize=10_000, ttu=_until, timer=lambda: self._clock())
        self._actives: TTLCache = TTLCache(maxsize=10_000, ttl=VMODEL_TTL_S)  # vmodel -> its active

    def resolve(self, model_id: str | None, vmodel_id: str | None) -> str:
        """The concrete model id to serve this request (a vmodel's active model)."""
        if (model_id is None) == (vmodel_id is None):
            raise InvalidArgument("give exactly one of model_id or vmodel_id")
        if model_id is not None:
            return validate_id(model_id)
        validate_id(vmodel_id, "vmodel")
        with self._config_lock:
            active = self._actives.get(vmodel_id)
        if active is not None:
            return active
        rec = self.vmodel_records.get(vmodel_id)
        if rec is None:  # not remembered: a vmodel created next is found at once
            raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
        with self._config_lock:
            self._actives[vmodel_id] = rec.active_model_id
        return rec.active_model_id

    def remembers(self, model_id: str | None, vmodel_id: str | None) -> bool:
        """Whether `route` would answer from memory now, without a Redis read: the vmodel's
        active, the model's config and its live copy are remembered, and no queue limit is to
        be checked (what an event loop may run inline; anything else reads Redis)."""
        with self._config_lock:
            concrete = model_id if model_id is not None else self._actives.get(vmodel_id)
            if concrete is None:
                return False
            cfg = self._configs.get(concrete, _UNCACHED)
            return cfg is not _UNCACHED and self._served_from_memory(concrete, cfg)

    def _served_from_memory(self, model_id: str, cfg: EffectiveConfig | None) -> bool:
        """Whether a request to `model_id` (with config `cfg`) skips the route: a live copy
        seen lately, and no queue limit to check (`_config_lock` held)."""
        return cfg is not None and not cfg.value("max_queue_size") and model_id in self._serving

    def model_config(self, model_id: str) -> EffectiveConfig | None:
        """The model's effective per-model config, cached briefly (one HGET per model per TTL).

        Only producer-side policy reads it (queue limit, default timeout and priority): a
        change takes effect within CONFIG_TTL_S.
        """
        with self._config_lock:
            # one lookup: TTLCache expires an entry between `in` and `[]` (a KeyError the soak hit)
            cached = self._configs.get(model_id, _UNCACHED)
        if cached is not _UNCACHED:
            return cached
        record = self.store.get_record(model_id)
        cfg = None if record is None else effective_config(
            model_id, record.info, self.store.settings, manifest=record_manifest(record)
        )
        with self._config_lock:
            self._configs[model_id] = cfg
        return cfg

    def prepare(self, model_id: str, loads: list[Prepared] | None = None) -> EffectiveConfig:
        """Check the model exists and its queue has room; if it has no copy and no load in
        progress, start one now. Returns the model's effective config.

        `loads`: the load command, if one is due, is added there instead of being sent, for the
        caller to push with its request in one round trip (`MeshClient`), the command first."""
        cfg = self.model_config(model_id)
        with self._config_lock:
            if self._served_from_memory(model_id, cfg):
                return cfg
        max_queue = cfg.value("max_queue_size") if cfg is not None else 0
        route, placement, loaded_for = self._route(model_id, max_queue)
        if route is Route.NOT_FOUND:
            with self._config_lock:
                self._configs.pop(model_id, None)
            raise ModelNotFound(f"model {model_id!r} not found")
        if route is Route.QUEUE_FULL:
            raise QueueFull(
                f"model {model_id!r} has {max_queue} requests waiting (max_queue_size); "
                "nothing was enqueued"
            )
        if cfg is None:  # registered between the config read and the route
            with self._config_lock:
                self._configs.pop(model_id, None)
            cfg = self.model_config(model_id)
        if route is Route.SERVING and loaded_for is not None:
            memory = serving_memory_s(loaded_for)
            if memory > 0:
                with self._config_lock:
                    self._serving[model_id] = self._clock() + memory
        if route is Route.CLAIMED and placement is None:
            # routed read-only (this producer may not place loads): the workers place it. Not
            # `not self._places_loads`, read after the route: another thread's refused load
            # command may have cleared it since this route placed the load, which then had
            # neither its command nor an undo (its requests waited a load timeout)
            self.store.want_load(model_id)
        elif placement is not None:
            if placement.worker is not None:
                self._send_load(placement.worker, model_id, loads)
            elif placement.error is not None:
                raise ModelLoadFailed(placement.error)
            elif placement.unmatched is not None:
                # not a load failure: a worker of its pool may come (docs/operations.md, "Worker
                # pools"); the status says why meanwhile
                if self._warn_once(model_id):
                    log.warning("requests for %s wait in its queue: %s", model_id, placement.unmatched)
            elif self._warn_once(model_id):
                log.warning("no live mesh worker: requests for %s wait in its queue", model_id)
        return cfg

    def _route(self, model_id: str, max_queue: int) -> Routed:
        # a cold request places its load on what the route read: two round trips less
        if self._places_loads:
            try:
                return self.store.route_and_place(
                    model_id, claimant=self.name, max_queue=max_queue, priority_steps=self.priority_steps,
                )  # fmt: skip
            except redis.RedisError as exc:
                if not is_permission_error(exc):
                    raise
                self._may_not_place(exc)
        return self.store.route_and_place(
            model_id, claimant=self.name, max_queue=max_queue, priority_steps=self.priority_steps, claim=False,
        )  # fmt: skip

    def _send_load(self, worker: str, model_id: str, loads: list[Prepared] | None = None) -> None:
        cmd = Command(op="load", model_id=model_id)
        if loads is not None:
            loads.append(command_message(self._publisher, worker, cmd))
            return
        try:
            send_command(self.store, worker, cmd)
        except Exception as exc:
            if not is_permission_error(exc):
                raise
            self.loads_refused(model_id, exc, [worker])

    def loads_refused(self, model_id: str, exc: BaseException, workers: Iterable[str]) -> None:
        """The push of the load commands for `workers` (sent here, or returned by `route` to be
        pushed with the request) was refused (this producer's Redis user may place loads but
        not write workers' queues): the placements are undone and the workers place the load
        instead."""
        for worker in workers:
            self.store.unplace(model_id, worker)
        self._may_not_place(exc)
        self.store.want_load(model_id)

    def _may_not_place(self, exc: BaseException) -> None:
        if self._places_loads:
            self._places_loads = False
            log.info("this producer's Redis user may not place loads (%s): cold requests ask the "
                     "workers to load their model", exc)  # fmt: skip

    def forget(self, model_id: str) -> None:
        """Drop what this router remembers of a model (after unregistering it here)."""
        with self._config_lock:
            self._configs.pop(model_id, None)
            self._serving.pop(model_id, None)

    def forget_vmodel(self, vmodel_id: str) -> None:
        """Read the vmodel again at its next request (after changing it here)."""
        with self._config_lock:
            self._actives.pop(vmodel_id, None)

    def _warn_once(self, model_id: str) -> bool:
        """True at most once per model per NO_WORKER_WARN_S (one line, not one per request)."""
        now = time.monotonic()
        with self._config_lock:
            if now - self._warned.get(model_id, -NO_WORKER_WARN_S) < NO_WORKER_WARN_S:
                return False
            self._warned[model_id] = now
            return True

    def route(
        self, model_id: str | None, vmodel_id: str | None, loads: list[Prepared] | None = None
    ) -> tuple[str, EffectiveConfig]:
        """(the concrete model, its effective config), its load started if due (`prepare`)."""
        concrete = self.resolve(model_id, vmodel_id)
        try:
            return concrete, self.prepare(concrete, loads)
        except ModelNotFound:
            if vmodel_id is None:
                raise
            # ModelMesh's `ModelMeshApi.callModel` retry (kserve/modelmesh
            # src/main/java/com/ibm/watson/modelmesh/ModelMeshApi.java): the active was switched (and auto-deleted) since we read the
            # vmodel. Read it again once: its new active, or its target if the active is still
            # the one not found.
            self.forget_vmodel(vmodel_id)
            retry = self._reresolve(vmodel_id, concrete)
            return retry, self.prepare(retry, loads)

    def _reresolve(self, vmodel_id: str, not_found: str) -> str:
        rec = self.vmodel_records.get(vmodel_id)
        if rec is None:
            raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
        for candidate in (rec.active_model_id, rec.target_model_id):
            if candidate != not_found:
                return candidate
        raise ModelNotFound(f"model {not_found!r} of vmodel {vmodel_id!r} not found")


def router_for(app: Celery) -> Router:
    router = getattr(app, "_mesh_router", None)
    if router is None:
        router = Router(app, StoreContext.from_app(app).store)
        app._mesh_router = router
    return router


def route_task(name: str, args: Any, kwargs: Any, options: dict, task: Any = None, **kw: Any):
    """Celery router: send `mesh.infer` to its concrete model's queue."""
    if name != INFER_TASK or options.get("queue"):
        return None
    from celery import current_app

    app = task.app if task is not None else current_app
    router = router_for(app)
    headers = options.get("headers") or {}
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    model_id = headers.get(MODEL_HEADER) or kwargs.get("model_id")
    vmodel_id = headers.get(VMODEL_HEADER) or kwargs.get("vmodel_id")
    if model_id is None and vmodel_id is None:
        raise InvalidArgument(
            "mesh.infer needs a model: set the mm-model-id or mm-vmodel-id header "
            "(or a model_id / vmodel_id keyword argument)"
        )
    concrete, cfg = router.route(model_id if model_id else None, None if model_id else vmodel_id)
    # the producer's own priority/expires win (Celery merges explicit options over ours)
    route = {"queue": router.keys.model_queue(concrete), "priority": PRIORITIES[cfg.value("default_priority")]}
    timeout_ms = cfg.value("default_timeout_ms")
    if timeout_ms:
        route["expires"] = datetime.now(timezone.utc) + timedelta(milliseconds=timeout_ms)
    return route
