"""The two small interfaces the worker's parts are built with, instead of the whole worker.

Celery's consumer parts get exactly their collaborators (`celery/worker/consumer/heart.py`:
`Heart(timer, eventer, interval)`), and kombu's virtual transport documents a handful of hooks
(`kombu/transport/virtual/base.py`: `_get`, `_put`, ...). Here likewise: the model manager and
the inference thread reach the Celery consumer only through `ConsumerPort`, and tell the rest
of the worker what happened to a copy only through `CopyEvents`. `CeleryConsumer`
(workers/consumer.py) implements `ConsumerPort` over a real consumer and `MeshWorker`
(workers/worker.py) implements `CopyEvents`; the unit tests implement both in memory
(tests/unit/fakes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mesh.errors import MeshError

    from .batcher import Pending


class ConsumerPort(Protocol):
    """The Celery consumer, as the worker's threads may use it.

    kombu channels belong to the consumer thread: every method here only schedules work on it
    (`call_soon`) and returns, except `requeue(..., wait_s=...)`, which waits for it.
    """

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the consumer thread, in the order of the calls."""

    def consume(self, model_id: str, wake: bool = True) -> None:
        """Start consuming the model's queue (`wake=False`: the caller rings the bell itself)."""

    def stop_consuming(self, model_id: str) -> None:
        """Stop consuming the model's queue."""

    def requeue(self, items: list[Pending], now: bool = False, wait_s: float = 0.0) -> None:
        """Put buffered requests back on their queue (`wait_s`: until they are back in Redis)."""

    def update_prefetch(self) -> None:
        """Budget prefetch again from the served models' batch sizes."""

    def event_dispatcher(self) -> Any:
        """Celery's event dispatcher (task and `mesh-batch` events), or None."""


class CopyEvents(Protocol):
    """What the model manager tells the worker about its copies (any manager thread)."""

    def copy_loaded(self, model_id: str) -> None:
        """A copy is serving here now (a vmodel transition may complete)."""

    def load_failed(self, model_id: str, message: str) -> None:
        """A load failed: retry elsewhere, or fail the model's requests."""

    def load_refused(self, model_id: str, reason: str) -> None:
        """This worker may not hold the model (its labels): hand the load to one that may."""

    def copy_unloaded(self, model_id: str, unregistered: bool) -> None:
        """A copy left (evicted, or its model unregistered)."""

    def fail_model(self, model_id: str, error: MeshError) -> None:
        """Answer the model's queued and arriving requests with `error` for a while."""
