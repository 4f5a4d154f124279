"""`./scripts/bench multimodel`: Zipf traffic over many models, mesh vs plain Celery.

One small model is trained once and its file copied `--models` times (m000.joblib, m001.joblib,
...), so every id is a distinct model file with the same load and predict cost. A seeded Zipf
stream (exponent `--zipf`) picks the model of each request. Both systems get the same stream,
the same machine, the same Redis and the same closed-loop load (`--window` requests
outstanding from two producer processes), in one run:

- plain Celery: two worker processes on one shared queue; each caches models in an LRU of
  `--cache` models inside the task and loads `<dir>/<id>.joblib` on a miss (bench/plain_multi.py);
- mesh: two mesh workers with room for `--cache` models each (MESH_WORKER_CAPACITY_BYTES =
  cache x the measured model size + half a model), per-model queues and the cold path;
  with `--beat`, also celery beat's scheduler (mesh.rebalance).

The first `--warmup` requests fill the caches and are not counted. Reported: throughput,
p50/p99 latency, and model loads per 1,000 requests (plain: counted by the task; mesh: the
workers' `mesh_model_loads_total`), plus the loads an ideal LRU would make on this stream
(2 independent LRUs of `--cache` vs one pooled LRU of 2 x `--cache`), and the best any cache of
2 x `--cache` makes knowing the popularities: below it only by requests sharing a load.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from bench.common import (
    CpuMeter,
    Producers,
    Sender,
    answers,
    clean,
    command_line,
    load_summary,
    machine,
    metric_sum,
    plain_producer,
    redis_for_bench,
    save,
    scrape,
    split,
    start_plain_worker,
)
from mesh import MeshClient, ModelInfo
from mesh.tools.examples import seed_digits_tensor
from mesh.tools.launcher import free_port, start_beat, start_worker, wait_for, wait_worker_ready


# ---------------------------------------------------------------------- the model
def train_gb(path: Path) -> Path:
    """Gradient boosting on the digits: 20 rounds x 10 classes = 200 small trees.

    Chosen because loading it costs something real while predicting is cheap: joblib
    unpickles 200 tree objects (~15-20 ms), predict is ~0.7 ms. Answers 8 on the
    example input of kserve/modelmesh-serving docs/predictors/README.md.
    """
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = load_digits(return_X_y=True)
    joblib.dump(GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x, y), path)
    return path


def model_factories() -> dict:
    from bench.batching import MODELS

    return {"gb": lambda d: train_gb(d / "gb.joblib"), **MODELS}


def measure_model(path: Path, repeats: int = 7) -> dict:
    """The runtime's own load time (median of `repeats`, file in the page cache) and the size
    a mesh worker accounts for the model."""
    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{path}")
    runtime = get_runtime("sklearn")
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded = runtime.load(path, info)
        times.append(time.perf_counter() - t0)
        size = loaded.size_bytes
    times.sort()
    return {"size_bytes": size, "file_bytes": path.stat().st_size,
            "load_ms_median": times[len(times) // 2] * 1e3, "load_ms_min": times[0] * 1e3}


def model_ids(n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"m{i:0{width}d}" for i in range(n)]


def copy_models(src: Path, directory: Path, ids: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for model_id in ids:
        shutil.copyfile(src, directory / f"{model_id}.joblib")


# ---------------------------------------------------------------------- the request stream
def zipf_stream(n_models: int, s: float, n: int, seed: int) -> list[int]:
    """`n` model indices, P(i) proportional to 1/(i+1)^s, from a seeded generator."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_models + 1) ** s
    return rng.choice(n_models, size=n, p=p / p.sum()).tolist()


def lru_misses(stream: list[int], capacity: int, caches: int = 1, count_from: int = 0, seed: int = 0) -> int:
    """Misses of `caches` independent LRUs of `capacity` when each request goes to a random
    one of them (a shared queue), or of one LRU when caches == 1; requests before
    `count_from` only warm the caches."""
    rng = np.random.default_rng(seed)
    lrus = [OrderedDict() for _ in range(caches)]
    picks = rng.integers(0, caches, size=len(stream)) if caches > 1 else [0] * len(stream)
    misses = 0
    for i, (m, c) in enumerate(zip(stream, picks)):
        lru = lrus[c]
        if m in lru:
            lru.move_to_end(m)
            continue
        misses += i >= count_from
        lru[m] = True
        if len(lru) > capacity:
            lru.popitem(last=False)
    return misses


def known_popularity_misses(stream: list[int], capacity: int, count_from: int = 0) -> int:
    """Misses of the best demand cache of `capacity` for independent requests when the
    popularities are known (the `capacity - 1` most popular models fixed, one slot rotating):
    what no retention policy learning them online beats on average, short of requests sharing
    a load. Model i is the i-th most popular (zipf_stream)."""
    rotating, misses = None, 0
    for i, m in enumerate(stream):
        if m < capacity - 1 or m == rotating:
            continue
        rotating = m
        misses += i >= count_from
    return misses


# ---------------------------------------------------------------------- senders (producer processes)
def mesh_sender(params: dict) -> Sender:
    if params.get("placement") == "spread":
        import mesh.store.state

        mesh.store.state.choose_worker = choose_worker_spread  # the experiment of --placement spread
    client = MeshClient(redis_url=params["url"], prefix=params["prefix"])
    request = [seed_digits_tensor()]
    return Sender(lambda model_id: client.infer(model_id=model_id, inputs=request),
                  lambda v: v["model_name"], client.close)


def plain_sender(params: dict) -> Sender:
    app = plain_producer(params["url"], params["prefix"])
    request = [seed_digits_tensor()]
    return Sender(lambda model_id: app.send_task("plain_multi.predict", args=[model_id, request]),
                  lambda v: [v["model_name"], v["load_s"]])


def choose_worker_spread(workers, *, failed_on=(), exclude=(), size_hint=0):
    """EXPERIMENT (`--placement spread`), not the mesh's rule: mesh/policy/placement.py's
    choose_worker, except that when the model fits nowhere, a random candidate is chosen
    instead of the (free bytes, model count, name) order, which ties once every worker is full
    and then sends every cold load to the same worker. Patched into the producers only."""
    import random

    blocked = set(failed_on) | set(exclude)
    candidates = [w for w in workers if not w.shutting_down and w.name not in blocked]
    if not candidates:
        return None
    fitting = [w for w in candidates if w.free_bytes >= size_hint]
    if fitting:
        return max(fitting, key=lambda w: (w.free_bytes, w.name)).name
    return random.choice(candidates).name


# ---------------------------------------------------------------------- the systems
def run_plain(url: str, model_dir: Path, logs: Path, warm: list[str], measured: list[str], args) -> dict:
    prefix = f"benchmm-plain{time.monotonic_ns()}"
    env = {"BENCH_MODEL_DIR": str(model_dir), "BENCH_CACHE_MODELS": str(args.cache)}
    procs = [start_plain_worker("bench.plain_multi", f"plain{i}", url, prefix, env, logs) for i in (1, 2)]
    params = {"url": url, "prefix": prefix}
    try:
        with Producers("bench.multimodel:plain_sender", params) as producers:
            app = plain_producer(url, prefix)
            send = lambda: app.send_task("plain_multi.predict", args=[warm[0], [seed_digits_tensor()]])  # noqa: E731
            wait_for(lambda: answers(send, lambda r: r.get(timeout=30)), timeout=60, what="the plain workers")
            producers.run(split(warm, producers.processes), args.window // producers.processes)
            workers_cpu, producers_cpu = CpuMeter([p.pid for p in procs]).start(), CpuMeter(producers.pids).start()
            parts = producers.run(split(measured, producers.processes), args.window // producers.processes)
            wcpu, pcpu = workers_cpu.stop(), producers_cpu.stop()
        records = [r for part in parts for r in part]
        out = load_summary(records)
        out.update(cpu_report(wcpu, pcpu, len(records)))
        loads = sum(1 for r in records if r.error is None and r.info[1] > 0)
        load_s = [r.info[1] for r in records if r.error is None and r.info[1] > 0]
        out.update(loads=loads, loads_per_1000=1000.0 * loads / len(records),
                   load_ms_mean=float(np.mean(load_s)) * 1e3 if load_s else 0.0)
        return out
    finally:
        for p in procs:
            p.stop()
        clean(url, prefix)


def run_mesh(url: str, model_dir: Path, logs: Path, ids: list[str], size: int, warm: list[str],
             measured: list[str], args) -> dict:
    prefix = f"benchmm-mesh{time.monotonic_ns()}"
    capacity = args.cache * size + size // 2
    ports = [free_port(), free_port()]
    procs = []
    beat = None
    client = MeshClient(redis_url=url, prefix=prefix)
    try:
        for i, port in enumerate(ports, 1):
            procs.append(start_worker(f"mm{i}", {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix,
                                                 "MESH_WORKER_CAPACITY_BYTES": capacity,
                                                 "MESH_METRICS_PORT": port}, logs, loglevel="WARNING"))
        for p in procs:
            wait_worker_ready(url, prefix, p.full_name, timeout=60, proc=p)
        for model_id in ids:
            client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{model_dir / f'{model_id}.joblib'}"))
        if args.beat:
            beat = start_beat({"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}, logs)
        params = {"url": url, "prefix": prefix, "placement": args.placement}
        with Producers("bench.multimodel:mesh_sender", params) as producers:
            producers.run(split(warm, producers.processes), args.window // producers.processes)
            before = [scrape(p) for p in ports]
            workers_cpu, producers_cpu = CpuMeter([p.pid for p in procs]).start(), CpuMeter(producers.pids).start()
            parts = producers.run(split(measured, producers.processes), args.window // producers.processes)
            wcpu, pcpu = workers_cpu.stop(), producers_cpu.stop()
            after = [scrape(p) for p in ports]
        records = [r for part in parts for r in part]
        out = load_summary(records)
        out.update(cpu_report(wcpu, pcpu, len(records)))

        def delta(name: str, **labels: str) -> list[float]:
            return [metric_sum(a, name, **labels) - metric_sum(b, name, **labels) for a, b in zip(after, before)]

        loads = delta("mesh_model_loads_total", outcome="success")
        out.update(loads=int(sum(loads)), loads_per_1000=1000.0 * sum(loads) / len(records),
                   loads_per_worker=[int(x) for x in loads],
                   requests_per_worker=[int(x) for x in delta("mesh_requests_total", outcome="success")],
                   load_ms_mean=1e3 * sum(delta("mesh_model_load_seconds_sum")) / max(1.0, sum(delta("mesh_model_load_seconds_count"))),
                   load_wait_ms_mean=1e3 * sum(delta("mesh_model_load_wait_seconds_sum"))
                   / max(1.0, sum(delta("mesh_model_load_wait_seconds_count"))),
                   mean_batch=sum(delta("mesh_items_total")) / max(1.0, sum(delta("mesh_batch_size_count"))),
                   capacity_bytes=capacity, beat=bool(args.beat), placement=args.placement)
        return out
    finally:
        client.close()
        if beat is not None:
            beat.stop()
        for p in procs:
            p.stop()
        clean(url, prefix)


# ---------------------------------------------------------------------- report
def cpu_report(workers: dict, producers: dict, requests: int) -> dict:
    """CPU per request of the workers and of the producers, and how busy the machine was."""
    return {"worker_cpu_ms_per_request": 1e3 * workers["cpu_s"] / requests,
            "producer_cpu_ms_per_request": 1e3 * producers["cpu_s"] / requests,
            "machine_busy": workers["machine_busy"]}


def report(r: dict) -> str:
    p, m, b = r["plain"], r["mesh"], r["lru_bound"]
    lines = [
        "| system | throughput (req/s) | p50 ms | p99 ms | model loads / 1,000 req | worker CPU ms / req "
        "| producer CPU ms / req | machine busy | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| plain Celery, 2 processes, LRU of {r['args']['cache']} each | {p['throughput']:.0f} | {p['p50_ms']:.1f} | "
        f"{p['p99_ms']:.1f} | {p['loads_per_1000']:.0f} | {p['worker_cpu_ms_per_request']:.2f} | "
        f"{p['producer_cpu_ms_per_request']:.2f} | {p['machine_busy']:.0%} | {p['failed']} |",
        f"| mesh, 2 workers with room for {r['args']['cache']} each{' + beat' if m['beat'] else ''}"
        f"{' (placement: spread EXPERIMENT)' if m['placement'] == 'spread' else ''} | {m['throughput']:.0f} | "
        f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['loads_per_1000']:.0f} | {m['worker_cpu_ms_per_request']:.2f} | "
        f"{m['producer_cpu_ms_per_request']:.2f} | {m['machine_busy']:.0%} | {m['failed']} |",
        f"| ideal LRU on this stream: 2 x LRU {r['args']['cache']} / one LRU {2 * r['args']['cache']} | | | | "
        f"{b['two_lrus_per_1000']:.0f} / {b['pooled_lru_per_1000']:.0f} | | | | |",
        f"| best cache of {2 * r['args']['cache']} knowing the popularities (no shared loads) | | | | "
        f"{b['known_popularity_per_1000']:.0f} | | | | |",
        "",
        f"Mesh loads per worker: {m['loads_per_worker']}, requests per worker: {m['requests_per_worker']}, "
        f"mean load {m['load_ms_mean']:.0f} ms inside the worker after a mean {m['load_wait_ms_mean']:.0f} ms "
        f"in its line of loads (plain: {p['load_ms_mean']:.0f} ms in the task), mean batch {m['mean_batch']:.2f}.",
        "",
        "| mesh / plain | throughput | p99 | fewer loads | less worker CPU per request |",
        "|---|---:|---:|---:|---:|",
        f"| ratio (targets: >= 2x, <= 1, >= 2x) | {m['throughput'] / p['throughput']:.2f}x | "
        f"{m['p99_ms'] / p['p99_ms']:.2f} | {p['loads_per_1000'] / max(1e-9, m['loads_per_1000']):.2f}x | "
        f"{p['worker_cpu_ms_per_request'] / m['worker_cpu_ms_per_request']:.2f}x |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench multimodel", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gb", help="gb (default), svm, mlp256 or mlp2048")
    ap.add_argument("--models", type=int, default=200, help="distinct model files")
    ap.add_argument("--cache", type=int, default=20, help="models per worker")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the model popularity")
    ap.add_argument("--requests", type=int, default=3000, help="measured requests")
    ap.add_argument("--warmup", type=int, default=1000, help="requests before measuring (fill the caches)")
    ap.add_argument("--window", type=int, default=32, help="requests kept outstanding (two producers)")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--beat", action="store_true", help="also run celery beat (the scheduler)")
    ap.add_argument("--placement", choices=("mesh", "spread"), default="mesh",
                    help="spread: an EXPERIMENT replacing the cold path's worker choice in the "
                    "producers (see choose_worker_spread); default: the mesh's own")
    ap.add_argument("--only", choices=("plain", "mesh"), help="run one system only (development)")
    args = ap.parse_args(argv)

    ids = model_ids(args.models)
    stream = [ids[i] for i in zipf_stream(args.models, args.zipf, args.warmup + args.requests, args.seed)]
    warm, measured = stream[: args.warmup], stream[args.warmup :]
    stream_idx = [int(m[1:]) for m in stream]
    results: dict = {"command": command_line("multimodel", argv), "machine": machine(), "args": vars(args)}
    results["lru_bound"] = {
        "two_lrus_per_1000": 1000.0 * lru_misses(stream_idx, args.cache, 2, args.warmup) / len(measured),
        "pooled_lru_per_1000": 1000.0 * lru_misses(stream_idx, 2 * args.cache, 1, args.warmup) / len(measured),
        "known_popularity_per_1000": 1000.0 * known_popularity_misses(stream_idx, 2 * args.cache, args.warmup)
        / len(measured),
    }
    results["distinct_models_requested"] = len(set(measured))
    with tempfile.TemporaryDirectory(prefix="mesh-bench-mm-") as tmp:
        tmpdir = Path(tmp)
        src = model_factories()[args.model](tmpdir)
        results["model"] = {"name": args.model, **measure_model(src)}
        print(f"== {args.model}: {results['model']['size_bytes']} bytes, runtime load "
              f"{results['model']['load_ms_median']:.1f} ms; {args.models} copies, Zipf s={args.zipf}", flush=True)
        model_dir = tmpdir / "models"
        copy_models(src, model_dir, ids)
        with redis_for_bench(tmpdir) as url:
            if args.only != "mesh":
                results["plain"] = run_plain(url, model_dir, tmpdir / "logs", warm, measured, args)
                print(f"   plain: {results['plain']['throughput']:.0f} req/s, "
                      f"{results['plain']['loads_per_1000']:.0f} loads/1000", flush=True)
            if args.only != "plain":
                results["mesh"] = run_mesh(url, model_dir, tmpdir / "logs", ids, results["model"]["size_bytes"],
                                           warm, measured, args)
                print(f"   mesh:  {results['mesh']['throughput']:.0f} req/s, "
                      f"{results['mesh']['loads_per_1000']:.0f} loads/1000", flush=True)
    if args.only is None:
        print()
        print(report(results))
    out = save("multimodel", results)
    print(f"\nraw figures: {out}")
    return 0
