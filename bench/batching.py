"""`./scripts/bench batching`: plain Celery vs mesh vs mesh with infer_many vs the ceiling.

Same machine, same Redis, same model, same request stream, one worker process each, in one
run. For each model it measures:
  (a) plain Celery: one task per request, the model cached in the worker (bench/plain.py);
  (b) mesh: MeshClient.infer, one message per request, batched by the worker;
  (c) mesh with MeshClient.infer_many: 32 requests per message;
  (d) the in-process ceiling: the runtime's predict on full batches in a loop, no queue.
Load: a closed loop keeping `--window` requests outstanding from two producer threads, then
one request at a time for the unloaded latency. Producers, worker and Redis share the
machine's cores, as they would on one host.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import answers as _answers
from bench.common import clean as _clean
from bench.common import CpuMeter, cpu_seconds, ms_by_thread, one_at_a_time, percentile, plain_producer
from mesh import BatchingConfig, MeshClient, ModelInfo
from mesh.broker.redis_url import resolve_redis_url
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.examples import SEED_DIGITS_INPUT, seed_digits_tensor, train_digits_mlp, train_digits_svm
from mesh.tools.launcher import REPO_ROOT, Proc, start_worker, wait_for, wait_worker_ready

RESULTS = REPO_ROOT / "bench" / "results"


# ---------------------------------------------------------------------- models
def heavy_mlp(path: Path) -> Path:
    """A wide float32 MLP (2048x2048): one row costs ~0.5 ms, 32 rows ~3.5 ms on one core.
    Quality is irrelevant here, so it trains for two epochs only."""
    import warnings

    import joblib
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier((2048, 2048), max_iter=2, random_state=0).fit(x.astype(np.float32), y)
    joblib.dump(model, path)
    return path


MODELS: dict[str, Callable[[Path], Path]] = {
    "svm": lambda d: train_digits_svm(d / "svm.joblib"),
    "mlp256": lambda d: train_digits_mlp(d / "mlp256.joblib"),
    "mlp2048": lambda d: heavy_mlp(d / "mlp2048.joblib"),
}


# ---------------------------------------------------------------------- load generation
def closed_loop(kind: str, params: dict, total: int, window: int, processes: int = 2) -> dict:
    """Keep `window` requests outstanding until `total` are answered, from `processes`
    producer processes (a Python producer's own CPU must not be what is measured)."""
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    w = max(1, window // processes)
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.starmap(_warm, [(kind, params)] * processes)
        t0 = time.perf_counter()
        parts = pool.starmap(_produce, [(kind, params, n, w) for n in per])
        elapsed = time.perf_counter() - t0
    latencies = [x for part in parts for x in part]
    return {"throughput": total / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3, "n": total}


_SENDERS: dict = {}


def sender(kind: str, params: dict) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(send, wait) for one producer process, built once per process."""
    key = (kind, params["prefix"])
    if key not in _SENDERS:
        request = [seed_digits_tensor()]
        if kind == "plain":
            app = plain_producer(params["url"], params["prefix"])
            send = lambda: app.send_task("plain.predict", args=[request])  # noqa: E731
        else:
            client = MeshClient(redis_url=params["url"], prefix=params["prefix"])
            if kind == "mesh":
                send = lambda: client.infer(model_id="m", inputs=request)  # noqa: E731
            else:
                items = [request] * params["batch"]
                send = lambda: client.infer_many(model_id="m", inputs=items)  # noqa: E731
        _SENDERS[key] = (send, lambda r: r.get(timeout=120))
    return _SENDERS[key]


def _warm(kind: str, params: dict) -> None:
    send, wait = sender(kind, params)
    wait(send())


def _produce(kind: str, params: dict, count: int, window: int) -> list[float]:
    send, wait = sender(kind, params)
    inflight: deque = deque()
    sent = 0
    out = []
    while len(out) < count:
        while sent < count and len(inflight) < window:
            inflight.append((time.perf_counter(), send()))
            sent += 1
        t0, handle = inflight.popleft()
        wait(handle)
        out.append(time.perf_counter() - t0)
    return out


def ceiling(path: Path, batch: int, seconds: float = 2.0) -> dict:
    """The runtime's predict on full batches in a loop, in this process, one BLAS thread."""
    from threadpoolctl import threadpool_limits

    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{path}")
    loaded = get_runtime("sklearn").load(path, info)
    x = {"input_0": np.asarray([SEED_DIGITS_INPUT] * batch, dtype=np.float32)}
    with threadpool_limits(1):
        loaded.runtime.predict(loaded.model, x)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            loaded.runtime.predict(loaded.model, x)
            n += 1
        elapsed = time.perf_counter() - t0
    return {"throughput": n * batch / elapsed, "batch_ms": elapsed / n * 1e3}


# ---------------------------------------------------------------------- the systems
def bench_plain(url: str, model_path: Path, logs: Path, args) -> dict:
    prefix = f"benchplain{os.getpid()}"
    env = {"MESH_REDIS_URL": url, "BENCH_PLAIN_PREFIX": prefix, "BENCH_MODEL_PATH": str(model_path),
           "PYTHONPATH": str(REPO_ROOT)}
    proc = Proc("plain", [sys.executable, "-m", "celery", "-A", "bench.plain", "worker", "-P", "solo",
                          "-E", "--without-mingle", "--without-gossip", "-Q", f"{prefix}.q",
                          "-n", "plain@%h", "--loglevel", "WARNING"],
                logs / "plain.log", env={**os.environ, **env}, cwd=REPO_ROOT)
    params = {"url": url, "prefix": prefix}
    try:
        send, wait = sender("plain", params)
        wait_for(lambda: _answers(send, wait), timeout=60, what="the plain worker")
        seq = one_at_a_time(send, wait, args.sequential)
        cpu0 = cpu_seconds([proc.popen.pid])
        load = closed_loop("plain", params, args.requests, args.window)
        load["worker_cpu_ms_per_req"] = (cpu_seconds([proc.popen.pid]) - cpu0) * 1e3 / args.requests
        return {"one_at_a_time": seq, "load": load}
    finally:
        proc.stop()
        _clean(url, prefix)


def bench_mesh(url: str, model_path: Path, logs: Path, args) -> dict:
    prefix = f"benchmesh{os.getpid()}"
    env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}
    proc = start_worker("bench", env, logs, loglevel="WARNING")
    client = MeshClient(redis_url=url, prefix=prefix)
    params = {"url": url, "prefix": prefix, "batch": args.batch}
    try:
        wait_worker_ready(url, prefix, proc.full_name, timeout=60, proc=proc)
        client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{model_path}",
                                             batching=BatchingConfig(max_batch_size=args.batch,
                                                                     max_batch_delay_ms=args.delay_ms)))
        client.ensure_loaded("m", sync=True, timeout=120)
        send, wait = sender("mesh", params)
        wait_for(lambda: _answers(send, wait), timeout=60, what="the mesh worker")
        seq = one_at_a_time(send, wait, args.sequential)
        before = client.list_workers()[0]
        cpu0 = cpu_seconds([proc.popen.pid])
        load = closed_loop("mesh", params, args.requests, args.window)
        load["worker_cpu_ms_per_req"] = (cpu_seconds([proc.popen.pid]) - cpu0) * 1e3 / args.requests
        after = wait_for(lambda: (w := client.list_workers()[0]).requests_total
                         >= before.requests_total + args.requests and w, timeout=15, what="heartbeat")
        load["mean_batch"] = (after.requests_total - before.requests_total) / max(
            1, after.batches_total - before.batches_total)
        meter = CpuMeter([proc.popen.pid]).start()
        many = closed_loop("many", params, args.many_messages, max(2, args.window // args.batch))
        used = meter.stop()
        many["worker_cpu_ms_per_msg"] = used["cpu_s"] * 1e3 / args.many_messages
        many["worker_threads_cpu_ms_per_msg"] = ms_by_thread(used["threads_cpu_s"], args.many_messages)
        many["throughput"] *= args.batch  # items per second
        return {"one_at_a_time": seq, "load": load, "infer_many": many}
    finally:
        client.close()
        proc.stop()
        _clean(url, prefix)


# ---------------------------------------------------------------------- report
def _cpu(system: dict) -> str:
    v = system["load"].get("worker_cpu_ms_per_req")
    return "" if v is None else f"{v:.2f}"


def report(results: dict) -> str:
    lines = ["| model | system | throughput (req/s) | p50 ms | p99 ms | 1-at-a-time p50 ms | mean batch | worker CPU ms/req |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        p, m = r["plain"], r["mesh"]
        lines.append(f"| {name} | plain Celery | {p['load']['throughput']:.0f} | {p['load']['p50_ms']:.1f} | "
                     f"{p['load']['p99_ms']:.1f} | {p['one_at_a_time']['p50_ms']:.2f} | 1 | {_cpu(p)} |")
        lines.append(f"| {name} | mesh | {m['load']['throughput']:.0f} | {m['load']['p50_ms']:.1f} | "
                     f"{m['load']['p99_ms']:.1f} | {m['one_at_a_time']['p50_ms']:.2f} | {m['load']['mean_batch']:.1f} | {_cpu(m)} |")
        per_msg = m["infer_many"].get("worker_cpu_ms_per_msg")
        lines.append(f"| {name} | mesh infer_many ({results['batch']}/msg) | {m['infer_many']['throughput']:.0f} | "
                     f"{m['infer_many']['p50_ms']:.1f} (per msg) | {m['infer_many']['p99_ms']:.1f} | | {results['batch']} | "
                     f"{'' if per_msg is None else f'{per_msg:.2f} per msg'} |")
        lines.append(f"| {name} | in-process ceiling | {r['ceiling']['throughput']:.0f} | | | | {results['batch']} | |")
    for name, r in results["models"].items():
        threads = r["mesh"]["infer_many"].get("worker_threads_cpu_ms_per_msg")
        if threads:
            lines.append("")
            lines.append(f"{name}, infer_many: the worker's CPU ms per message by thread: "
                         + ", ".join(f"{t} {ms:.2f}" for t, ms in threads.items()))
    lines.append("")
    lines.append("| model | mesh / plain throughput | mesh / plain p99 | 1-at-a-time mesh / plain p50 | infer_many / ceiling |")
    lines.append("|---|---|---|---|---|")
    for name, r in results["models"].items():
        p, m = r["plain"], r["mesh"]
        lines.append(f"| {name} | {m['load']['throughput'] / p['load']['throughput']:.2f}x | "
                     f"{m['load']['p99_ms'] / p['load']['p99_ms']:.2f} | "
                     f"{m['one_at_a_time']['p50_ms'] / p['one_at_a_time']['p50_ms']:.2f} | "
                     f"{m['infer_many']['throughput'] / r['ceiling']['throughput']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench batching", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp2048,mlp256,svm")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--window", type=int, default=64, help="requests kept outstanding")
    ap.add_argument("--sequential", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size and items per infer_many message")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="max_batch_delay_ms of the mesh model")
    # 1,000 messages: a few seconds per model. The 93 of `--requests` / `--batch` took half a
    # second, and alternated runs of one tree gave 21-46 % of the ceiling
    ap.add_argument("--many-messages", type=int, default=1000, help="infer_many messages measured")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        tmpdir = Path(tmp)
        url = resolve_redis_url()
        embedded = None
        if url is None:
            embedded = EmbeddedRedis(tmpdir / "redis")
            url = embedded.start()
        try:
            results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "python": platform.python_version()},
                       "args": vars(args), "batch": args.batch, "models": {}}
            for name in args.models.split(","):
                path = MODELS[name](tmpdir)
                print(f"== {name}", flush=True)
                r = {"ceiling": ceiling(path, args.batch)}
                r["plain"] = bench_plain(url, path, tmpdir / "logs", args)
                print(f"   plain: {r['plain']['load']['throughput']:.0f} req/s", flush=True)
                r["mesh"] = bench_mesh(url, path, tmpdir / "logs", args)
                print(f"   mesh:  {r['mesh']['load']['throughput']:.0f} req/s, "
                      f"infer_many {r['mesh']['infer_many']['throughput']:.0f} items/s, "
                      f"ceiling {r['ceiling']['throughput']:.0f}", flush=True)
                results["models"][name] = r
        finally:
            if embedded is not None:
                embedded.stop()
    table = report(results)
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "batching.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {out}")
    return 0
