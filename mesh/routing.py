"""Routing: from a model or vmodel id to the concrete model's queue, with the cold path.

Used by MeshClient.infer and, as a Celery router (`task_routes` in celeryconfig.py), by any
producer that sends `mesh.infer` with an `mm-model-id` / `mm-vmodel-id` header or a
`model_id` / `vmodel_id` keyword argument. Unknown ids raise ModelNotFound at enqueue time.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery

from .commands import send_command
from .errors import InvalidArgument, ModelLoadFailed, ModelNotFound
from .ids import validate_id
from .keys import Keys
from .models import Command, VModelRecord
from .state import Route, StateStore
from .tasks import INFER_TASK

log = logging.getLogger("mesh.routing")

MODEL_HEADER = "mm-model-id"
VMODEL_HEADER = "mm-vmodel-id"


class Router:
    def __init__(self, app: Celery, store: StateStore) -> None:
        self.app = app
        self.store = store
        self.keys: Keys = store.keys
        self.name = f"client:{socket.gethostname()}:{os.getpid()}"

    def resolve(self, model_id: str | None, vmodel_id: str | None) -> str:
        """The concrete model id to serve this request (a vmodel's active model)."""
        if (model_id is None) == (vmodel_id is None):
            raise InvalidArgument("give exactly one of model_id or vmodel_id")
        if model_id is not None:
            return validate_id(model_id)
        validate_id(vmodel_id, "vmodel")
        raw = self.store.r.hget(self.keys.vmodels, vmodel_id)
        if raw is None:
            raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
        return VModelRecord.model_validate_json(raw).active_model_id

    def prepare(self, model_id: str) -> None:
        """Check the model exists; if it has no copy and no load in progress, start one now."""
        route = self.store.route(model_id, claimant=self.name)
        if route is Route.NOT_FOUND:
            raise ModelNotFound(f"model {model_id!r} not found")
        if route is Route.CLAIMED:
            placement = self.store.place_load(model_id)
            if placement.worker is not None:
                send_command(self.app, self.keys, placement.worker, Command(op="load", model_id=model_id))
            elif placement.error is not None:
                raise ModelLoadFailed(placement.error)
            else:
                log.warning("no live mesh worker: requests for %s wait in its queue", model_id)

    def route(self, model_id: str | None, vmodel_id: str | None) -> str:
        concrete = self.resolve(model_id, vmodel_id)
        self.prepare(concrete)
        return concrete


def router_for(app: Celery) -> Router:
    router = getattr(app, "_mesh_router", None)
    if router is None:
        import redis

        from .settings import MeshSettings

        settings = MeshSettings(prefix=app.conf.mesh_prefix, redis_url=app.conf.mesh_redis_url)
        client = redis.Redis.from_url(app.conf.mesh_redis_url)
        router = Router(app, StateStore(client, Keys(settings.prefix), settings))
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
    concrete = router.route(model_id if model_id else None, None if model_id else vmodel_id)
    return {"queue": router.keys.model_queue(concrete)}
