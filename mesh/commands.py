"""Commands to one worker's private queue (load/unload), sent as `mesh.command` tasks."""

from __future__ import annotations

from celery import Celery

from .keys import Keys
from .models import Command
from .tasks import COMMAND_TASK


def send_command(app: Celery, keys: Keys, worker: str, cmd: Command) -> None:
    app.send_task(
        COMMAND_TASK,
        kwargs=cmd.model_dump(mode="json"),
        queue=keys.worker_queue(worker),
        ignore_result=True,
        priority=0,  # commands overtake requests waiting in the same worker's lists
    )
