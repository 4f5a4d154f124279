"""`./scripts/bench coldstart`: what the mesh adds to a cold start, beyond the model's load.

One mesh worker, `--repeats` x 2 fresh models (distinct copies of one model file, registered but
never loaded). For each, one request: the time from `MeshClient.infer` to the answer, minus
the runtime's own load time of that file, measured in this process on the same file (median
of several loads, file in the page cache as it is for the worker). That difference is the
cold path's overhead: the route script and load claim, the placement, the load command, the
worker's bookkeeping around the load, starting to consume the model's queue, and the request
itself. The worker's `mesh_model_load_seconds` for the model splits it into "inside the
worker's load" and "everything else".

Two situations, `--repeats` each: the worker has room (first half), and the worker is full,
so each cold start also evicts the least recently used model (second half).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import clean, command_line, machine, metric_sum, redis_for_bench, save, scrape
from bench.multimodel import copy_models, measure_model, model_factories
from mesh import MeshClient, ModelInfo
from mesh.tools.examples import seed_digits_tensor
from mesh.tools.launcher import free_port, start_worker, wait_for, wait_worker_ready


def cold_start(client: MeshClient, port: int, model_id: str) -> dict:
    before = scrape(port)
    t0 = time.perf_counter()
    handle = client.infer(model_id=model_id, inputs=[seed_digits_tensor()])
    t1 = time.perf_counter()
    result = handle.get(timeout=120)
    t2 = time.perf_counter()
    assert result["model_name"] == model_id, result
    # the load's metrics are observed right after the model is installed: wait for them
    after = wait_for(lambda: (s := scrape(port)) and metric_sum(s, "mesh_model_load_seconds_count", model=model_id)
                     > metric_sum(before, "mesh_model_load_seconds_count", model=model_id) and s,
                     timeout=30, what=f"the load metrics of {model_id}")
    worker_load = metric_sum(after, "mesh_model_load_seconds_sum", model=model_id) - metric_sum(
        before, "mesh_model_load_seconds_sum", model=model_id)
    evicted = metric_sum(after, "mesh_model_unloads_total") - metric_sum(before, "mesh_model_unloads_total")
    t3 = time.perf_counter()
    client.infer(model_id=model_id, inputs=[seed_digits_tensor()]).get(timeout=30)
    warm = time.perf_counter() - t3
    return {"model": model_id, "total_ms": (t2 - t0) * 1e3, "enqueue_ms": (t1 - t0) * 1e3,
            "worker_load_ms": worker_load * 1e3, "evicted": int(evicted), "warm_request_ms": warm * 1e3}


def summarize(rows: list[dict], runtime_load_ms: float) -> dict:
    over = [r["total_ms"] - runtime_load_ms for r in rows]
    outside = [r["total_ms"] - r["worker_load_ms"] for r in rows]
    inside = [r["worker_load_ms"] - runtime_load_ms for r in rows]
    med = statistics.median
    return {"n": len(rows), "total_ms_median": med(r["total_ms"] for r in rows),
            "overhead_ms_median": med(over), "overhead_ms_max": max(over),
            "outside_load_ms_median": med(outside), "outside_load_ms_max": max(outside),
            "inside_load_ms_median": med(inside), "inside_load_ms_max": max(inside),
            "enqueue_ms_median": med(r["enqueue_ms"] for r in rows),
            "warm_request_ms_median": med(r["warm_request_ms"] for r in rows)}


def report(r: dict) -> str:
    lines = [f"Runtime's own load time of the file (in-process median): {r['model']['load_ms_median']:.1f} ms", "",
             "| worker | cold starts | first answer, median ms | overhead median ms | overhead max ms | "
             "of which outside the worker's load (median / max) | inside it, beyond the runtime's load (median / max) | "
             "warm request ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("room", "has room"), ("full", "full: evicts one model")):
        s = r[name]
        lines.append(f"| {label} | {s['n']} | {s['total_ms_median']:.1f} | {s['overhead_ms_median']:.1f} | "
                     f"{s['overhead_ms_max']:.1f} | {s['outside_load_ms_median']:.1f} / {s['outside_load_ms_max']:.1f} | "
                     f"{s['inside_load_ms_median']:.1f} / {s['inside_load_ms_max']:.1f} | {s['warm_request_ms_median']:.1f} |")
    f = r["first_in_process"]
    lines.append("")
    lines.append(f"Not counted above: the worker process's very first load ({f['total_ms']:.0f} ms to the first "
                 f"answer, {f['worker_load_ms']:.0f} ms inside the load): it imports the model's modules.")
    lines.append("Target: overhead under 100 ms.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench coldstart", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gb", help="gb (default), svm, mlp256 or mlp2048")
    ap.add_argument("--repeats", type=int, default=8, help="cold starts per situation")
    ap.add_argument("--polling-interval", type=float, default=None,
                    help="the worker's MESH_POLLING_INTERVAL_S (default: the mesh default)")
    args = ap.parse_args(argv)

    results: dict = {"command": command_line("coldstart", argv), "machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-cold-") as tmp:
        tmpdir = Path(tmp)
        src = model_factories()[args.model](tmpdir)
        ids = [f"cold{i:03d}" for i in range(2 * args.repeats)]
        copy_models(src, tmpdir / "models", ["first", *ids])
        # the same file the worker loads, from the page cache as the worker finds it
        results["model"] = {"name": args.model, **measure_model(tmpdir / "models" / f"{ids[0]}.joblib", repeats=9)}
        size = results["model"]["size_bytes"]
        print(f"== {args.model}: runtime load {results['model']['load_ms_median']:.1f} ms", flush=True)
        with redis_for_bench(tmpdir) as url:
            prefix = f"benchcold{time.monotonic_ns()}"
            port = free_port()
            env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix, "MESH_METRICS_PORT": port,
                   "MESH_WORKER_CAPACITY_BYTES": args.repeats * size + size // 2}
            if args.polling_interval is not None:
                env["MESH_POLLING_INTERVAL_S"] = args.polling_interval
            proc = start_worker("cold", env, tmpdir / "logs", loglevel="WARNING")
            client = MeshClient(redis_url=url, prefix=prefix)
            try:
                wait_worker_ready(url, prefix, proc.full_name, timeout=60, proc=proc)
                for model_id in ["first", *ids]:
                    client.register_model(model_id, ModelInfo(runtime="sklearn",
                                                              uri=f"file://{tmpdir / 'models' / f'{model_id}.joblib'}"))
                # the worker's first load of this model type imports its modules: reported apart
                results["first_in_process"] = cold_start(client, port, "first")
                client.unregister_model("first")
                wait_for(lambda: metric_sum(scrape(port), "mesh_model_unloads_total", model="first") >= 1,
                         timeout=30, what="the first model's unload")
                rows = [cold_start(client, port, model_id) for model_id in ids]
            finally:
                client.close()
                proc.stop()
                clean(url, prefix)
    results["cold_starts"] = rows
    results["room"] = summarize(rows[: args.repeats], results["model"]["load_ms_median"])
    results["full"] = summarize(rows[args.repeats :], results["model"]["load_ms_median"])
    print()
    print(report(results))
    out = save("coldstart", results)
    print(f"\nraw figures: {out}")
    return 0
