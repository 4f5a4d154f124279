"""Task classes. Workers never run them through the pool: each has its own Strategy.

`mesh.infer` messages are buffered per model and answered in batches by the worker's
inference thread (workers/strategy.py); `mesh.command` messages (load/unload on one worker's
private queue) are handed to the model manager. Both run only in a mesh worker.
"""

from __future__ import annotations

from celery import Task

INFER_TASK = "mesh.infer"
COMMAND_TASK = "mesh.command"


class InferTask(Task):
    name = INFER_TASK
    acks_late = True
    typing = False  # kwargs are checked by the worker, per request, with a clear error
    Strategy = "workers.strategy:infer_strategy"

    def run(self, *args, **kwargs):
        raise RuntimeError(
            "mesh.infer is answered by a mesh worker's batching strategy; "
            "send it with MeshClient.infer or app.send_task (it cannot run eagerly)"
        )


class CommandTask(Task):
    name = COMMAND_TASK
    ignore_result = True
    typing = False
    Strategy = "workers.strategy:command_strategy"

    def run(self, *args, **kwargs):
        raise RuntimeError("mesh.command is handled by a mesh worker's model manager")
