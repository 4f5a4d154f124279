"""`./scripts/bench closedloop`: plain Celery and mesh as a Python service calls them.

C client threads in this process, each calling `infer(...).get()` (plain Celery:
`send_task(...).get()`) in a closed loop, one request at a time per thread; both systems one
after the other in one run, defaults against defaults. Per system: throughput, p50/p99, and CPU
per request on both sides: the producer (this process, all its threads: `time.process_time`)
and the workers (/proc, all their threads). This is the shape of the workloads the lean
request path is measured on (docs/benchmarks.md, "Closed-loop clients"):

- `svc1`: the digits SVC, 1 client (the per-request cost decides);
- `mlp16`: a wide MLP (2048, 2048, 2048), 16 clients (batching decides);
- `zipf`: Zipf(1.1) over 200 small MLP(256) models, 2 workers with room for 20 each, 16 clients
  (loads and the per-request cost decide). Plain Celery: bench/plain_multi.py, an LRU of 20
  models in each of two worker processes;
- `async`: the digits SVC at 64 client threads on both systems, and mesh from ONE asyncio
  thread keeping 1,000 requests in flight (`await client.infer_async(...)`), against the
  threaded producer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    CpuMeter,
    command_line,
    clean,
    latency_summary,
    machine,
    metric_sum,
    ms_by_thread,
    plain_producer,
    redis_for_bench,
    save,
    scrape,
    start_plain_worker,
)
from bench.multimodel import copy_models, measure_model, model_ids, zipf_stream
from mesh import MeshClient, ModelInfo
from mesh.tools.examples import seed_digits_tensor, train_digits_mlp, train_digits_svm
from mesh.tools.launcher import REPO_ROOT, free_port, start_worker, wait_for, wait_worker_ready

WORKLOADS = ("svc1", "mlp16", "zipf", "async")
ASYNC_IN_FLIGHT = 1000


def wide_mlp(path: Path) -> Path:
    """MLP (2048, 2048, 2048) on the digits, two epochs (quality is irrelevant here)."""
    import warnings

    import joblib
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier((2048, 2048, 2048), max_iter=2, random_state=0).fit(x.astype(np.float32), y)
    joblib.dump(model, path)
    return path


# ---------------------------------------------------------------------- the load
def drive(call: Callable[[str], Any], streams: Sequence[Sequence[str]]) -> dict:
    """One thread per stream, each calling `call(model_id)` (send and wait) for every item of
    its stream in turn. Returns the latency summary, the throughput and this process's CPU."""
    latencies: list[list[float]] = [[] for _ in streams]
    errors: list[BaseException] = []
    start = threading.Barrier(len(streams) + 1)

    def client(i: int) -> None:
        start.wait()
        out = latencies[i]
        try:
            for model_id in streams[i]:
                t0 = time.perf_counter()
                call(model_id)
                out.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported after the run: a failed request is a failed bench
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(streams))]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    flat = [x for part in latencies for x in part]
    return {**latency_summary(flat), "throughput": len(flat) / elapsed,
            "producer_cpu_ms_per_req": 1e3 * cpu / len(flat)}


def drive_async(infer_async: Callable[[str], Any], streams: Sequence[Sequence[str]], in_flight: int) -> dict:
    """One asyncio loop on this thread keeping `in_flight` requests outstanding (each of
    `in_flight` coroutines awaits `infer_async(model_id)` for the next id in turn)."""
    ids = iter([m for stream in streams for m in stream])
    latencies: list[float] = []

    async def one() -> None:
        for model_id in ids:
            t0 = time.perf_counter()
            await infer_async(model_id)
            latencies.append(time.perf_counter() - t0)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(in_flight)))

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {**latency_summary(latencies), "throughput": len(latencies) / elapsed,
            "producer_cpu_ms_per_req": 1e3 * cpu / len(latencies)}


def streams_for(workload: str, clients: int, requests: int, ids: list[str], seed: int) -> list[list[str]]:
    if workload != "zipf":
        return [["m"] * (requests // clients) for _ in range(clients)]
    flat = [ids[i] for i in zipf_stream(len(ids), 1.1, requests, seed)]
    return [flat[i::clients] for i in range(clients)]


def redis_cpu_seconds(url: str) -> float:
    """The Redis server's CPU so far (`INFO cpu`: its main and background threads), wherever it
    runs: what the scripts, polls and commands of each system cost the shared server."""
    r = redis.Redis.from_url(url)
    try:
        info = r.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    finally:
        r.close()


def measured(run: Callable[[list[list[str]]], dict], pids: list[int], warm: list[list[str]],
             streams: list[list[str]], url: str) -> dict:
    run(warm)
    meter = CpuMeter(pids).start()
    redis0 = redis_cpu_seconds(url)
    out = run(streams)
    redis_s = redis_cpu_seconds(url) - redis0
    used = meter.stop()
    out["redis_cpu_ms_per_req"] = 1e3 * redis_s / out["n"]
    out["worker_cpu_ms_per_req"] = 1e3 * used["cpu_s"] / out["n"]
    out["worker_threads_cpu_ms_per_req"] = ms_by_thread(used["threads_cpu_s"], out["n"])
    out["machine_busy"] = used["machine_busy"]
    return out


# ---------------------------------------------------------------------- the systems
def bench_plain(url: str, workload: str, model: Path, logs: Path, warm: list, streams: list) -> dict:
    prefix = f"benchcl-plain{time.monotonic_ns()}"
    request = [seed_digits_tensor()]
    if workload == "zipf":
        procs = [start_plain_worker("bench.plain_multi", f"plain{i}", url, prefix,
                                    {"BENCH_MODEL_DIR": str(model), "BENCH_CACHE_MODELS": "20"}, logs)
                 for i in (1, 2)]  # fmt: skip
        task, args_of = "plain_multi.predict", lambda m: [m, request]
    else:  # one model: bench/plain.py loads it once, at its start
        procs = [start_plain_worker("bench.plain", "plain", url, prefix, {"BENCH_MODEL_PATH": str(model)}, logs)]
        task, args_of = "plain.predict", lambda m: [request]
    app = plain_producer(url, prefix)
    try:
        first = streams[0][0]
        wait_for(lambda: app.send_task(task, args=args_of(first)).get(timeout=30) is not None, 60,
                 what="the plain workers")  # fmt: skip

        loaded: list[bool] = []  # bench/plain_multi.py says in each result whether it loaded

        def call(m: str) -> None:
            result = app.send_task(task, args=args_of(m)).get(timeout=120)
            if workload == "zipf":
                loaded.append(result["load_s"] > 0)

        def run(s: list[list[str]]) -> dict:
            return drive(call, s)

        out = measured(run, [p.pid for p in procs], warm, streams, url)
        if workload == "zipf":
            out["loads"] = sum(loaded)  # warm-up included, as mesh's
        return out
    finally:
        app.close()
        for p in procs:
            p.stop()
        clean(url, prefix)


def bench_mesh(url: str, workload: str, model: Path, logs: Path, warm: list, streams: list,
               ids: list[str], size: int) -> dict:
    prefix = f"benchcl-mesh{time.monotonic_ns()}"
    env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}
    ports = [free_port() for _ in range(2 if workload == "zipf" else 1)]
    if workload == "zipf":
        env["MESH_WORKER_CAPACITY_BYTES"] = 20 * size + size // 2
    procs = [start_worker(f"cl{i}", {**env, "MESH_METRICS_PORT": port}, logs, loglevel="WARNING")
             for i, port in enumerate(ports, 1)]  # fmt: skip
    client = MeshClient(redis_url=url, prefix=prefix)
    request = [seed_digits_tensor()]
    try:
        for p in procs:
            wait_worker_ready(url, prefix, p.full_name, timeout=60, proc=p)
        for model_id in ids:
            path = model / f"{model_id}.joblib" if workload == "zipf" else model
            client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))

        def run(s: list[list[str]]) -> dict:
            return drive(lambda m: client.infer(model_id=m, inputs=request).get(timeout=120), s)

        before = [scrape(p) for p in ports]
        out = measured(run, [p.pid for p in procs], warm, streams, url)
        after = [scrape(p) for p in ports]
        loads = sum(metric_sum(a, "mesh_model_loads_total", outcome="success") for a in after) - sum(
            metric_sum(b, "mesh_model_loads_total", outcome="success") for b in before)
        out["loads"] = int(loads)  # warm-up included
        if workload == "async":
            def run_async(s: list[list[str]]) -> dict:
                return drive_async(lambda m: client.infer_async(model_id=m, inputs=request), s, ASYNC_IN_FLIGHT)

            out["async"] = measured(run_async, [p.pid for p in procs], warm, streams, url)
        return out
    finally:
        client.close()
        for p in procs:
            p.stop()
        clean(url, prefix)


# ---------------------------------------------------------------------- report
def report(results: dict) -> str:
    lines = ["| workload | system | clients | req/s | p50 ms | p99 ms | producer CPU ms/req | worker CPU ms/req "
             "| Redis CPU ms/req |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = ["| workload | mesh / plain throughput | p50 | p99 | producer CPU | worker CPU | Redis CPU "
              "| plain / mesh loads |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["workloads"].items():
        for system in ("plain", "mesh"):
            if system not in r:
                continue
            s = r[system]
            lines.append(f"| {name} | {system} | {r['clients']} | {s['throughput']:.0f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {s['producer_cpu_ms_per_req']:.2f} | {s['worker_cpu_ms_per_req']:.2f} | "
                         f"{_redis(s)} |")
        if "async" in r.get("mesh", {}):
            m, a = r["mesh"], r["mesh"]["async"]
            lines.append(f"| {name} | mesh, 1 asyncio thread, {ASYNC_IN_FLIGHT} in flight | 1 | {a['throughput']:.0f} | "
                         f"{a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['producer_cpu_ms_per_req']:.2f} | "
                         f"{a['worker_cpu_ms_per_req']:.2f} | {_redis(a)} |")
            ratios.append(f"| {name}: asyncio / threaded mesh | {a['throughput'] / m['throughput']:.2f}x | | | "
                          f"{a['producer_cpu_ms_per_req'] / m['producer_cpu_ms_per_req']:.2f} | | | |")
        if "plain" not in r or "mesh" not in r:
            continue
        p, m = r["plain"], r["mesh"]
        fewer = f"{p['loads'] / m['loads']:.2f}x" if "loads" in p and m.get("loads") else ""
        ratios.append(f"| {name} | {m['throughput'] / p['throughput']:.2f}x | {m['p50_ms'] / p['p50_ms']:.2f} | "
                      f"{m['p99_ms'] / p['p99_ms']:.2f} | {m['producer_cpu_ms_per_req'] / p['producer_cpu_ms_per_req']:.2f} | "
                      f"{m['worker_cpu_ms_per_req'] / p['worker_cpu_ms_per_req']:.2f} | {_redis_ratio(m, p)} | {fewer} |")
    return "\n".join(lines + [""] + ratios)


def _redis(s: dict) -> str:
    return f"{s['redis_cpu_ms_per_req']:.2f}" if "redis_cpu_ms_per_req" in s else ""  # older saved runs lack it


def _redis_ratio(m: dict, p: dict) -> str:
    if not (m.get("redis_cpu_ms_per_req") and p.get("redis_cpu_ms_per_req")):
        return ""
    return f"{m['redis_cpu_ms_per_req'] / p['redis_cpu_ms_per_req']:.2f}"


PNG = REPO_ROOT / "docs" / "img" / "closedloop.png"


def draw(results: dict, png: Path = PNG) -> Path:
    """Four panels, one bar pair (plain, mesh) per workload: req/s, p99, and CPU per request
    on each side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results["workloads"].items() if "plain" in r and "mesh" in r]
    panels = [("throughput", "requests/s", 1.0), ("p99_ms", "p99 latency (ms)", 1.0),
              ("producer_cpu_ms_per_req", "producer CPU per request (ms)", 1.0),
              ("worker_cpu_ms_per_req", "worker CPU per request (ms)", 1.0)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    width = 0.38
    for ax, (key, label, _) in zip(axes, panels):
        for i, (system, color) in enumerate((("plain", "#d62728"), ("mesh", "#1f77b4"))):
            values = [results["workloads"][n][system][key] for n in names]
            bars = ax.bar([x + (i - 0.5) * width for x in range(len(names))], values, width,
                          color=color, label="plain Celery" if system == "plain" else "mesh")  # fmt: skip
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    m = results["machine"]
    fig.suptitle(f"Closed-loop clients calling infer().get(), defaults against defaults: {m['cpus']} CPUs "
                 f"({m['cpu_model']}), load average {m['loadavg_at_start'][0]:.1f} at the start", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench closedloop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--requests", type=int, default=0, help="measured requests per system (default: per workload)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--only", choices=("plain", "mesh"), help="run one system only (development)")
    ap.add_argument("--plot", action="store_true", help=f"also draw {PNG.relative_to(REPO_ROOT)}")
    args = ap.parse_args(argv)
    wanted = [w for w in args.workloads.split(",") if w]
    unknown = set(wanted) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    plan = {"svc1": (1, 1000, 50), "mlp16": (16, 1600, 160), "zipf": (16, 3000, 1000), "async": (64, 6000, 600)}
    results: dict = {"command": command_line("closedloop", argv), "machine": machine(), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-cl-") as tmp, redis_for_bench(Path(tmp)) as url:
        tmpdir, logs = Path(tmp), Path(tmp) / "logs"
        logs.mkdir()
        for workload in wanted:
            clients, requests, warmup = plan[workload]
            requests = args.requests or requests
            ids, size = ["m"], 0
            if workload in ("svc1", "async"):
                model = train_digits_svm(tmpdir / "svc.joblib")
            elif workload == "mlp16":
                model = wide_mlp(tmpdir / "mlp2048x3.joblib")
            else:
                src = train_digits_mlp(tmpdir / "mlp256.joblib", hidden=(256,))
                size = int(measure_model(src)["size_bytes"])
                ids = model_ids(200)
                model = tmpdir / "zipf-models"
                copy_models(src, model, ids)
            warm = streams_for(workload, clients, warmup, ids, args.seed + 1)
            streams = streams_for(workload, clients, requests, ids, args.seed)
            print(f"== {workload}: {clients} client thread(s), {requests} requests", flush=True)
            out: dict = {"clients": clients, "requests": requests}
            if args.only != "mesh":
                plain = out["plain"] = bench_plain(url, workload, model, logs, warm, streams)
                print(f"   plain: {plain['throughput']:.0f} req/s, p50 {plain['p50_ms']:.2f} ms"
                      + (f", {1000 * plain['loads'] / (requests + warmup):.0f} loads/1,000" if workload == "zipf" else ""),
                      flush=True)  # fmt: skip
            if args.only != "plain":
                mesh = out["mesh"] = bench_mesh(url, workload, model, logs, warm, streams, ids, size)
                print(f"   mesh:  {mesh['throughput']:.0f} req/s, p50 {mesh['p50_ms']:.2f} ms, "
                      f"{1000 * mesh['loads'] / (requests + warmup):.0f} loads/1,000", flush=True)
                if "async" in mesh:
                    print(f"   mesh, asyncio: {mesh['async']['throughput']:.0f} req/s", flush=True)
            results["workloads"][workload] = out
    print()
    print(report(results))
    print(f"\nraw figures: {save('closedloop', results)}")
    if args.plot:
        print(f"plot: {draw(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
