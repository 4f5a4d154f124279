"""The multi-model baseline: plain Celery, each worker process caching models in an LRU.

`celery -A bench.plain_multi worker -P solo -Q <prefix>.q` with BENCH_MODEL_DIR set. The task
takes a model id and its inputs; on a miss it loads `<BENCH_MODEL_DIR>/<id>.joblib` with the
same runtime as a mesh worker and keeps it in a `cachetools.LRUCache` of BENCH_CACHE_MODELS
(default 20) models. Every worker consumes the one shared queue: what a Celery shop without
per-model routing would run. Same Redis, JSON, acks_late and events as the mesh worker
(bench/plain.py's configuration).

The result carries, besides the outputs, whether this request loaded its model and wall-clock
timestamps of the task's phases, so the benchmarks can count loads and break latency down
without instrumenting Celery.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cachetools import LRUCache
from celery import Celery

from bench import plain
from mesh.models import ModelInfo
from mesh.protocol.ids import encode_id
from mesh.protocol.tensors import decode_inputs, encode_outputs

app = Celery("plain_multi", broker=plain.URL, backend=plain.URL)
app.conf.update(plain.app.conf)
# Celery's default prefetch (4 per process): with a shared queue, a larger prefetch lets one
# process hoard the outstanding requests while the other idles.
app.conf.update(worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")))

_cache: LRUCache = LRUCache(maxsize=int(os.environ.get("BENCH_CACHE_MODELS", "20")))
_limited = False


def _load(model_id: str):
    global _limited
    from threadpoolctl import threadpool_limits

    from workers.runtimes import get_runtime

    if not _limited:
        threadpool_limits(1)  # same as a mesh worker's default (MESH_INTRA_OP_THREADS=1)
        _limited = True
    # encoded: an id may hold `/` now; the encoding has none (and plain ids keep their file names)
    path = Path(os.environ["BENCH_MODEL_DIR"]) / f"{encode_id(model_id)}.joblib"
    info = ModelInfo(runtime="sklearn", uri=f"file://{path}")
    return get_runtime("sklearn").load(path, info)


@app.task(name="plain_multi.predict")
def predict(model_id, inputs):
    t_start = time.time()
    loaded = _cache.get(model_id)
    load_s = 0.0
    if loaded is None:
        t0 = time.perf_counter()
        loaded = _cache[model_id] = _load(model_id)
        load_s = time.perf_counter() - t0
    arrays = decode_inputs(inputs)
    if loaded.signature and len(loaded.signature) == 1 and len(arrays) == 1:
        arrays = {loaded.signature[0].name: next(iter(arrays.values()))}
    t_predict = time.time()
    outputs = loaded.runtime.predict(loaded.model, arrays)
    t_predicted = time.time()
    return {"model_name": model_id, "outputs": encode_outputs(outputs), "load_s": load_s,
            "t": {"start": t_start, "predict": t_predict, "predicted": t_predicted, "end": time.time()}}
