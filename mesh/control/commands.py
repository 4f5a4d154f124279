"""Commands to one worker's private queue (load/unload), sent as `mesh.command` tasks.

Each is the message `app.send_task(COMMAND_TASK, ..., ignore_result=True, priority=0)` would
send, pushed with its queue's bell by one script call (mesh/broker/publisher.py): through
kombu's Producer a command cost a producer ~1 ms of CPU, a fifth of a busy producer's
interpreter time under a churning multi-model load, where every cold request sends one
(docs/benchmarks.md, "Commands without kombu").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from celery import Celery

from mesh.broker.publisher import InferPublisher, Prepared
from mesh.models import Command

if TYPE_CHECKING:
    from mesh.store.state import StateStore


def command_message(publisher: InferPublisher, worker: str, cmd: Command) -> Prepared:
    """`cmd` for `worker`'s private queue, ready to push (with other messages, in one call)."""
    return publisher.prepare_command(publisher.keys.worker_queue(worker), cmd.model_dump(mode="json"))


def send_command(store: StateStore, worker: str, cmd: Command) -> None:
    """Send `cmd` to `worker`'s private queue, on the Redis of `store` (the broker's)."""
    publisher = InferPublisher(store.r, store.keys)
    publisher.push([command_message(publisher, worker, cmd)])


def unload_unregistered(
    app: Celery,
    store: StateStore,
    model_id: str,
    holders: Iterable[str],
    *,
    fail_queued: bool = True,
    reason: str | None = None,
    generation: float | None = None,
) -> list[str]:
    """Tell the live workers in `holders` to drop a model whose record is gone (unregistered or
    auto-deleted); returns the workers told.

    With `fail_queued` the requests still queued for it fail with NOT_FOUND, and when no live
    worker holds it, one live worker answers them: a request never waits for a model that no
    longer exists. Without it the copies retire gracefully (a re-registered model with the same
    id answers what was queued). `generation`: the deleted record's `created_at`, so that a
    worker reading the command after the model was registered again knows it is stale.
    """
    cmd = Command(
        op="unload", model_id=model_id, fail_queued=fail_queued,
        reason=reason or f"model {model_id!r} was unregistered", generation=generation,
    )  # fmt: skip
    live = store.alive(holders)
    if fail_queued and not live:
        steps = list(app.conf.broker_transport_options.get("priority_steps", [0]))
        if store.queue_depth(model_id, steps) > 0:
            workers = [w.name for w in store.live_workers() if not w.shutting_down]
            live = set(workers[:1])
    for worker in sorted(live):
        send_command(store, worker, cmd)
    return sorted(live)
