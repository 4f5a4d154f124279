"""`./scripts/bench plot`: throughput and p99 against offered load, mesh vs plain Celery.

An offered-load sweep on the models of `scripts/bench batching` (the digits SVM and the heavy
2048x2048 MLP): one worker process per system, one model, a closed loop keeping `window`
requests outstanding (from 1 to 128: one producer process for a window of 1, two above) for
max(`--min-requests`, 10 x window) requests per point. The same set-up as batching: plain
Celery runs bench/plain.py (one task per request), the mesh batches (max_batch_size 32, no
delay). Draws docs/img/throughput_p99.png; `--from-json` redraws from bench/results/plot.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import (
    RESULTS,
    Producers,
    Sender,
    answers,
    clean,
    command_line,
    load_summary,
    machine,
    plain_producer,
    redis_for_bench,
    save,
    start_plain_worker,
)
from mesh import BatchingConfig, MeshClient, ModelInfo
from mesh.tools.examples import seed_digits_tensor
from mesh.tools.launcher import REPO_ROOT, start_worker, wait_for, wait_worker_ready

PNG = REPO_ROOT / "docs" / "img" / "throughput_p99.png"
LABELS = {"svm": "digits SVM (predict ~0.1 ms/row)", "mlp2048": "MLP 2048x2048 (predict ~0.5 ms/row)",
          "mlp256": "MLP 256x256", "gb": "gradient boosting"}


def mesh_one(params: dict) -> Sender:
    client = MeshClient(redis_url=params["url"], prefix=params["prefix"])
    request = [seed_digits_tensor()]
    return Sender(lambda _: client.infer(model_id="m", inputs=request), close=client.close)


def plain_one(params: dict) -> Sender:
    app = plain_producer(params["url"], params["prefix"])
    request = [seed_digits_tensor()]
    return Sender(lambda _: app.send_task("plain.predict", args=[request]))


def sweep(producers: Producers, windows: list[int], min_requests: int) -> list[dict]:
    points = []
    for window in windows:
        streams = 1 if window < producers.processes else producers.processes
        n = max(min_requests, 10 * window)
        parts = producers.run([[None] * (n // streams)] * streams, max(1, window // streams))
        s = load_summary([r for part in parts for r in part])
        points.append({"window": window, **{k: s[k] for k in ("n", "failed", "throughput", "p50_ms", "p99_ms")}})
        print(f"      window {window:4d}: {s['throughput']:6.0f} req/s, p99 {s['p99_ms']:7.1f} ms", flush=True)
    return points


def run_plain(url: str, path: Path, logs: Path, args) -> list[dict]:
    prefix = f"benchsweepplain{time.monotonic_ns()}"
    proc = start_plain_worker("bench.plain", "sweepplain", url, prefix, {"BENCH_MODEL_PATH": str(path)}, logs)
    params = {"url": url, "prefix": prefix}
    try:
        app = plain_producer(url, prefix)
        send = lambda: app.send_task("plain.predict", args=[[seed_digits_tensor()]])  # noqa: E731
        wait_for(lambda: answers(send, lambda r: r.get(timeout=30)), timeout=60, what="the plain worker")
        with Producers("bench.plot:plain_one", params) as producers:
            return sweep(producers, args.windows, args.min_requests)
    finally:
        proc.stop()
        clean(url, prefix)


def run_mesh(url: str, path: Path, logs: Path, args) -> list[dict]:
    prefix = f"benchsweepmesh{time.monotonic_ns()}"
    proc = start_worker("sweep", {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}, logs, loglevel="WARNING")
    client = MeshClient(redis_url=url, prefix=prefix)
    try:
        wait_worker_ready(url, prefix, proc.full_name, timeout=60, proc=proc)
        client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{path}",
                                             batching=BatchingConfig(max_batch_size=32, max_batch_delay_ms=0)))
        client.ensure_loaded("m", sync=True, timeout=120)
        with Producers("bench.plot:mesh_one", {"url": url, "prefix": prefix}) as producers:
            return sweep(producers, args.windows, args.min_requests)
    finally:
        client.close()
        proc.stop()
        clean(url, prefix)


def draw(results: dict, png: Path = PNG) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["sweep"])
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False, sharex=True)
    styles = {"mesh": {"color": "#1f77b4", "marker": "o", "label": "mesh (batching)"},
              "plain": {"color": "#d62728", "marker": "s", "label": "plain Celery"}}
    for col, model in enumerate(models):
        for system, points in results["sweep"][model].items():
            w = [p["window"] for p in points]
            axes[0][col].plot(w, [p["throughput"] for p in points], **styles[system])
            axes[1][col].plot(w, [p["p99_ms"] for p in points], **styles[system])
        axes[0][col].set_title(LABELS.get(model, model))
        axes[0][col].set_ylabel("throughput (requests/s)")
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylabel("p99 latency (ms)")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("offered load: requests outstanding (closed loop)")
        windows = [p["window"] for p in next(iter(results["sweep"][model].values()))]
        for row in axes:
            row[col].set_xscale("log", base=2)
            row[col].set_xticks(windows, [str(w) for w in windows])
            row[col].grid(True, which="both", alpha=0.3)
            row[col].legend(loc="best")
    m = results["machine"]
    fig.suptitle(f"One worker process per system, same Redis, same machine: {m['cpus']} CPUs ({m['cpu_model']}), "
                 f"load average {m['loadavg_at_start'][0]:.1f} at the start", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def report(results: dict) -> str:
    lines = ["| model | window | mesh req/s | plain req/s | mesh p99 ms | plain p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for model, systems in results["sweep"].items():
        for pm, pp in zip(systems["mesh"], systems["plain"]):
            lines.append(f"| {model} | {pm['window']} | {pm['throughput']:.0f} | {pp['throughput']:.0f} | "
                         f"{pm['p99_ms']:.1f} | {pp['p99_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench plot", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="svm,mlp2048")
    ap.add_argument("--windows", default="1,2,4,8,16,32,64,128",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--min-requests", type=int, default=300)
    ap.add_argument("--from-json", action="store_true", help="redraw from bench/results/plot.json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads((RESULTS / "plot.json").read_text())
    else:
        from bench.batching import MODELS

        results = {"command": command_line("plot", argv), "machine": machine(), "args": vars(args), "sweep": {}}
        with tempfile.TemporaryDirectory(prefix="mesh-bench-plot-") as tmp:
            tmpdir = Path(tmp)
            with redis_for_bench(tmpdir) as url:
                for model in args.models.split(","):
                    path = MODELS[model](tmpdir)
                    print(f"== {model}\n   plain:", flush=True)
                    plain = run_plain(url, path, tmpdir / "logs", args)
                    print("   mesh:", flush=True)
                    mesh = run_mesh(url, path, tmpdir / "logs", args)
                    results["sweep"][model] = {"mesh": mesh, "plain": plain}
        out = save("plot", results)
        print(f"\nraw figures: {out}")
        print(report(results))
    print(f"plot: {draw(results)}")
    return 0
