"""A worker's model manager and its collaborators in the test process: a real Redis, the real
batcher and metrics, and in-memory ports (tests/unit/fakes.py). No worker process.

Models are `python`-runtime `Slow` models (tests/faults/fault_models.py) or `Picky` ones
(tests/integration/pyclasses.py): a Slow model's size is what its spec says, and a gate file
holds its load for as long as a test needs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from mesh.models import ModelInfo, WorkerState
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.state import StateStore
from tests.unit.fakes import FakeConsumer, FakeEvents
from workers.batcher import Batcher
from workers.collector import Collector
from workers.manager import ModelManager
from workers.metrics import WorkerMetrics

MB = 1_000_000
WORKER = "w1@unit"
SLOW = "tests.faults.fault_models:Slow"


class Rig:
    """A manager with its collaborators, and helpers to register and load test models."""

    def __init__(self, redis_url: str, prefix: str, tmp: Path, collector: Collector | None = None,
                 **settings: object) -> None:
        self.tmp = tmp
        self.settings = MeshSettings(
            prefix=prefix, redis_url=redis_url, disk_cache_dir=str(tmp / "cache"),
            **{"worker_capacity_bytes": 3 * MB, "fresh_overcommit_fraction": 0.0, "python_modules": "tests",
               **settings},
        )  # fmt: skip
        self.client = redis.Redis.from_url(redis_url)
        self.store = StateStore(self.client, Keys(prefix), self.settings)
        self.batcher = Batcher(lambda ids: {m: 0 for m in ids})
        self.metrics = WorkerMetrics(WORKER, 0)
        self.consumer = FakeConsumer()
        self.events = FakeEvents()
        self.manager = ModelManager(
            self.settings, WORKER, self.store, self.batcher, self.metrics, self.consumer, self.events,
            collector=collector,
        )
        # status counts only live workers' copies
        self.store.write_heartbeat(WorkerState(
            name=WORKER, host="unit", pid=1, capacity_bytes=3 * MB, used_bytes=0,
            started_at=time.time(), updated_at=time.time()), ttl_s=60)  # fmt: skip

    def register(self, model_id: str, size: int = MB, python_class: str = SLOW, **spec: object) -> None:
        path = self.tmp / f"{model_id}.json"
        path.write_text(json.dumps({"size": size, **spec}))
        info = ModelInfo(runtime="python", uri=f"file://{path}", python_class=python_class)
        self.store.register_model(model_id, info)

    def load(self, model_id: str) -> None:
        self.manager.request_load(model_id)
        self.events.wait_for(("loaded", model_id))

    def loads_counted(self, model_id: str) -> float:
        return self.metrics.loads.labels(model_id, "success")._value.get()

    def close(self) -> None:
        # a load still running writes its copy, signature and change-log entry when it ends:
        # after the test's prefix was deleted, they would stay in Redis for good
        self.manager.shutdown(wait=True)
        self.batcher.stop()
        self.metrics.close()
        self.client.close()
