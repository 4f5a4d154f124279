"""The baseline: plain Celery, one task per request, the model cached in the worker.

`celery -A bench.plain worker -P solo -Q <queue>` with BENCH_MODEL_PATH / BENCH_RUNTIME set.
Same Redis, same JSON serializer, acks_late and events as the mesh worker, so the difference
measured is the batching design, not the configuration.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from celery import Celery

from mesh.models import ModelInfo
from mesh.protocol.tensors import decode_inputs, encode_outputs

PREFIX = os.environ.get("BENCH_PLAIN_PREFIX", "benchplain")
URL = os.environ.get("MESH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("plain", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_send_task_events=True,
    worker_prefetch_multiplier=64,
    worker_hijack_root_logger=False,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:"},
    task_default_queue=f"{PREFIX}.q",
    event_exchange=f"{PREFIX}.celeryev",
    control_exchange=f"{PREFIX}.pidbox",
)


@lru_cache(maxsize=1)
def _model():
    from threadpoolctl import threadpool_limits

    from workers.runtimes import get_runtime

    threadpool_limits(1)  # same as a mesh worker's default (MESH_INTRA_OP_THREADS=1)
    path = Path(os.environ["BENCH_MODEL_PATH"])
    info = ModelInfo(runtime=os.environ.get("BENCH_RUNTIME", "sklearn"), uri=f"file://{path}")
    return get_runtime(info.runtime).load(path, info)


@app.task(name="plain.predict")
def predict(inputs):
    loaded = _model()
    arrays = decode_inputs(inputs)
    if loaded.signature and len(loaded.signature) == 1 and len(arrays) == 1:
        arrays = {loaded.signature[0].name: next(iter(arrays.values()))}
    return {"outputs": encode_outputs(loaded.runtime.predict(loaded.model, arrays))}
