"""Task classes. Workers never run them through the pool: each has its own Strategy.

`mesh.infer` messages are buffered per model and answered in batches by the worker's
inference thread (workers/strategy.py); `mesh.command` messages (load/unload on one worker's
private queue) are handed to the model manager. Both run only in a mesh worker.
`mesh.rebalance` and `mesh.sync_repository` (scheduler runs sent by celery beat) go to the
worker's control thread.

The bodies of the scheduler runs are named by import string, like the Strategies: the broker
layer names the control plane without importing it (docs/architecture.md, "Code layout").
"""

from __future__ import annotations

from celery import Task, signals
from kombu.utils.imports import symbol_by_name

from mesh.protocol.messages import COMMAND_TASK, INFER_TASK, REBALANCE_TASK, SYNC_REPOSITORY_TASK

REBALANCE_RUN = "mesh.control.rebalance:rebalance_from_app"
SYNC_REPOSITORY_RUN = "mesh.control.repository:sync_from_app"


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


class RebalanceTask(Task):
    """One scheduler run (mesh/control/rebalance.py), sent by celery beat to `<prefix>.control`,
    which every mesh worker consumes (MESH_WORKER_CONTROL_QUEUE). Its Strategy hands the run to
    the worker's control thread, so intake never waits behind it; acked on receipt: a run lost
    with its worker is simply the next tick's work.
    """

    name = REBALANCE_TASK
    ignore_result = True
    acks_late = False
    typing = False
    Strategy = "workers.strategy:control_strategy"

    def run(self, *args, **kwargs):
        report = symbol_by_name(REBALANCE_RUN)(self.app)
        return report.model_dump(mode="json") if report.ran else None


class SyncRepositoryTask(Task):
    """Sync the model repository into the registry (mesh/control/repository.py, docs/storage.md).

    Sent by celery beat to `<prefix>.control` every MESH_REPOSITORY_SYNC_INTERVAL_S when the
    beat has MESH_MODEL_DIR, and once when beat starts (stateless boot). The repository and the
    S3 credentials are the executing worker's own MESH_MODEL_DIR and MESH_STORAGE_CONFIG; the
    message carries no argument, and any it has is ignored: which directory is the repository
    is the operator's setting, not something a message may name (docs/security.md). A Redis
    lock keeps syncs one at a time; acked early like mesh.rebalance (a lost run is the next tick's).
    """

    name = SYNC_REPOSITORY_TASK
    ignore_result = True
    acks_late = False
    typing = False
    Strategy = "workers.strategy:control_strategy"

    def run(self, *args, **kwargs):
        return symbol_by_name(SYNC_REPOSITORY_RUN)(self.app).model_dump(mode="json")


def _sync_repository_at_beat_start(sender=None, **kwargs):
    """Stateless boot: the first sync goes out when beat starts, not one interval later."""
    app = getattr(sender, "app", None)
    entry = getattr(getattr(app, "conf", None), "beat_schedule", {}).get("mesh-sync-repository")
    if app is None or not entry:
        return
    app.send_task(SYNC_REPOSITORY_TASK, kwargs=entry.get("kwargs", {}), **entry.get("options", {}))


signals.beat_init.connect(_sync_repository_at_beat_start, weak=False)
