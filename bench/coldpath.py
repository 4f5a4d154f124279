"""`./scripts/bench coldpath`: the producer's side of a cold request, in one process.

A cold request (the first for a model nobody serves) claims the model's load, places it on a
worker, records the copy, sends the load command and then the request. Its cost on the
producer is measured here without any worker, so the figure is deterministic enough to compare
two trees in the same minute (the closed-loop multi-model runs vary by more than the change):
`--models` registered models, two worker heartbeats with room, and rounds in which every model
gets one `MeshClient.infer` (each cold: copies, claims, lines of loads and queues are removed
between rounds; the models' configs are cached first, as in a producer already running).
Figures: median over the rounds after the first, of CPU and wall time per request.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from uuid import uuid4

import numpy as np
import redis

from bench.common import clean, command_line, machine, redis_for_bench, save
from mesh import MeshClient, ModelInfo
from mesh.models import WorkerState
from mesh.settings import MeshSettings

WORKERS = ("w1@bench", "w2@bench")


def _heartbeats(client: MeshClient, capacity: int) -> None:
    now = time.time()
    for name in WORKERS:
        client.store.write_heartbeat(WorkerState(name=name, host="bench", pid=1, capacity_bytes=capacity,
                                                 used_bytes=0, started_at=now, updated_at=now), 120.0)  # fmt: skip


def _cold_again(r: redis.Redis, client: MeshClient, models: list[str]) -> None:
    """Every model cold again: no copy, no claim, no line of loads, nothing queued."""
    k = client.keys
    with r.pipeline(transaction=False) as p:
        for m in models:
            p.delete(k.copies(m), k.load_claim(m), *k.queue_list_keys(k.model_queue(m), [0, 5]))
        for w in WORKERS:
            p.delete(k.load_line(w), *k.queue_list_keys(k.worker_queue(w), [0, 5]))
        p.execute()


def run(url: str, n_models: int, rounds: int) -> dict:
    prefix = f"benchcold{uuid4().hex[:8]}"
    client = MeshClient(settings=MeshSettings(prefix=prefix, redis_url=url))
    r = redis.Redis.from_url(url)
    models = [f"m{i}" for i in range(n_models)]
    x = np.zeros((1, 64), dtype=np.float32)
    try:
        for m in models:
            client.register_model(m, ModelInfo(runtime="sklearn", uri="file:///nonexistent.joblib",
                                               size_bytes=600_000))  # fmt: skip
        cpu, wall = [], []
        for _ in range(rounds):
            _heartbeats(client, capacity=20 * 600_000)
            _cold_again(r, client, models)
            for m in models:
                client.router.model_config(m)
            c0, w0 = time.process_time(), time.perf_counter()
            for m in models:
                handle = client.infer(m, inputs=x)
                client._replies.discard(handle.id)  # nobody will answer: stop watching
            cpu.append((time.process_time() - c0) / n_models * 1e6)
            wall.append((time.perf_counter() - w0) / n_models * 1e6)
        return {"cpu_us": statistics.median(cpu[1:]), "wall_us": statistics.median(wall[1:]),
                "cpu_us_rounds": cpu, "wall_us_rounds": wall}  # fmt: skip
    finally:
        client.close()
        r.close()
        clean(url, prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench coldpath", description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp, redis_for_bench(tmp) as url:
        result = run(url, args.models, max(2, args.rounds))
    print(f"cold request, producer side: CPU {result['cpu_us']:.0f} us, wall {result['wall_us']:.0f} us "
          f"(median of {len(result['cpu_us_rounds']) - 1} rounds of {args.models})")
    out = save("coldpath", {"machine": machine(), "command": command_line("coldpath", argv), **result})
    print(f"raw figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
