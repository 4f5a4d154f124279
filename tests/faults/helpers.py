"""Shared helpers of the fault suite."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from celery.result import AsyncResult

from mesh.models import BatchingConfig, ModelInfo, ModelState
from mesh.tools.launcher import wait_for

MB = 1_000_000
X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}  # y = 10


def slow_info(tmp_path: Path, name: str, *, delay: float = 0.0, gate: Path | None = None,
              size: int = MB, max_batch_size: int = 8, hang: float = 0.0, hang_mark: Path | None = None,
              predict_timeout_s: float | None = None) -> ModelInfo:  # fmt: skip
    """A `tests.faults.fault_models:Slow` model: `delay` seconds per batch, a load that waits
    while `gate` exists; with `hang`, a predict given fault_models.HANG_VALUE sleeps that long
    (after writing `hang_mark`)."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"size": size, "delay": delay, "gate": str(gate) if gate else None,
                                "hang": hang, "hang_mark": str(hang_mark) if hang_mark else None}))  # fmt: skip
    return ModelInfo(
        runtime="python", uri=f"file://{spec}", python_class="tests.faults.fault_models:Slow",
        size_bytes=size, batching=BatchingConfig(max_batch_size=max_batch_size, max_batch_delay_ms=2,
                                                 predict_timeout_s=predict_timeout_s),
    )  # fmt: skip


def copies_of(client, model_id: str) -> dict[str, str]:
    return {c.worker: c.state.value for c in client.get_model_status(model_id).copies}


def served_by(client, model_id: str) -> dict[str, int]:
    """worker -> requests answered for `model_id`, from the live workers' heartbeats."""
    return {
        w.name: m.requests_total
        for w in client.list_workers()
        for m in w.models
        if m.model_id == model_id
    }


def wait_loaded(client, model_id: str, timeout: float = 60) -> None:
    status = client.ensure_loaded(model_id, sync=True, timeout=timeout)
    assert status.state is ModelState.LOADED, status


class Producer(threading.Thread):
    """Sends requests as fast as it can and keeps every handle (and any send error): `total`
    of them, or, with `backlog`, until `stop()`, holding about that many waiting in the model's
    queue. A fixed total drains in a time set by the host's speed, so a test that waits for
    something to happen "while a backlog waits" (a heartbeat that comes every 0.5 s, a worker
    seen answering) raced the drain and lost on a fast host (a clean-clone CI run timed out
    after 60 s with the queue empty); a kept backlog waits as long as the test does."""

    def __init__(self, client, model_id: str, total: int | None = None, inputs=None,
                 backlog: int | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        assert (total is None) != (backlog is None), "a total or a backlog to keep"
        self.client, self.model_id, self.total, self.backlog = client, model_id, total, backlog
        self.inputs = inputs or [X]
        self.sent: list[AsyncResult] = []
        self.error: BaseException | None = None
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.is_set() and (self.total is None or len(self.sent) < self.total):
                if self.backlog is not None and len(self.sent) % 10 == 0:
                    while self.client.store.queue_depth(self.model_id, [0, 5]) >= self.backlog:
                        if self._stopped.wait(0.005):
                            return
                self.sent.append(self.client.infer(model_id=self.model_id, inputs=self.inputs))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stopped.set()

    def finish(self, timeout: float = 120) -> list[AsyncResult]:
        if self.backlog is not None:
            self.stop()
        self.join(timeout=timeout)
        assert not self.is_alive(), "producer did not finish"
        assert self.error is None, f"a send failed: {self.error!r}"
        return self.sent


def outcomes(results: list[AsyncResult], timeout: float) -> dict[str, int]:
    """Wait for every result; count answered (the right value), failed and unanswered."""
    counts = {"answered": 0, "wrong": 0, "failed": 0}
    errors: list[str] = []
    for r in results:
        try:
            out = r.get(timeout=timeout)
        except Exception as exc:  # counted, shown on failure
            counts["failed"] += 1
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if out["outputs"][0]["data"] == [10.0]:
            counts["answered"] += 1
        else:
            counts["wrong"] += 1
    if errors:
        counts["errors"] = sorted(set(errors))[:5]  # type: ignore[assignment]
    return counts


def wait_state(client, model_id: str, state: ModelState, timeout: float) -> None:
    wait_for(lambda: client.get_model_status(model_id).state is state, timeout,
             what=f"{model_id} to be {state.value}")  # fmt: skip
