"""The Celery app: `celery -A mesh.app worker|beat|flower`.

Settings come from celeryconfig.py (static Celery options) and MESH_* variables (URL,
prefix, timeouts). The worker-side parts (bootstep, strategies) are named by import path, so
producers importing this module do not import numpy models or the worker machinery.
"""

from __future__ import annotations

from celery import Celery

from mesh.broker.celery_options import mesh_celery_settings
from mesh.broker.tasks import CommandTask, InferTask, RebalanceTask, SyncRepositoryTask
from mesh.settings import MeshSettings


def create_app(settings: MeshSettings | None = None, redis_url: str | None = None) -> Celery:
    celery_app = Celery("mesh", set_as_current=settings is None)
    celery_app.config_from_object("celeryconfig")
    if settings is not None or redis_url is not None:
        celery_app.conf.update(mesh_celery_settings(settings, redis_url))
    celery_app.register_task(InferTask())
    celery_app.register_task(CommandTask())
    celery_app.register_task(RebalanceTask())
    celery_app.register_task(SyncRepositoryTask())
    celery_app.steps["consumer"].add("workers.bootstep:MeshConsumerStep")
    celery_app.steps["worker"].add("workers.bootstep:MeshWorkerStep")
    return celery_app


app = create_app()
infer = app.tasks[InferTask.name]
