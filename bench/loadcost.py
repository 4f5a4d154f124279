"""`./scripts/bench loadcost`: what one load costs a worker's CPU, plain Celery and mesh.

closedloop's zipf setting (200 copies of a small MLP(256), 2 workers with room for 20 models
each, 16 client threads calling `infer(...).get()`), driven twice per system in one run:

- `churn`: every request for a model drawn uniformly from the 200, so most requests load one;
- `one`: every request for the same model, so none does.

The worker CPU per request of `churn` less that of `one`, divided by the loads per request of
`churn`, is what a load costs beyond serving a request: the unpickling both systems pay, and
for mesh everything around it (the record read, the copy's announcement, the victims'
retirement, the consumer adding and cancelling queues, the hand-offs between threads). Mesh
workers' CPU is also given by thread role (a worker names its threads). The difference holds
the per-request part of `churn` a batch of one pays against the batches `one` fills (16
clients on one model), so it is an upper bound of a load's cost.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from bench import closedloop
from bench.common import command_line, machine, redis_for_bench, save
from bench.multimodel import copy_models, measure_model, model_ids
from mesh.tools.examples import train_digits_mlp

CLIENTS = 16
STREAMS = ("churn", "one")


def streams(kind: str, ids: list[str], requests: int, seed: int) -> list[list[str]]:
    rnd = random.Random(seed)
    pick = (lambda: rnd.choice(ids)) if kind == "churn" else (lambda: ids[0])
    return [[pick() for _ in range(requests // CLIENTS)] for _ in range(CLIENTS)]


def per_load(r: dict) -> float | None:
    """Worker CPU ms per load: churn's CPU per request over one's, per load per request."""
    churn, one = r["churn"], r["one"]
    loads_per_req = churn["loads"] / (churn["n"] + churn["warm"]) - one["loads"] / (one["n"] + one["warm"])
    if loads_per_req <= 0:
        return None
    return (churn["worker_cpu_ms_per_req"] - one["worker_cpu_ms_per_req"]) / loads_per_req


def report(results: dict) -> str:
    lines = ["| system | stream | req/s | loads per request | worker CPU ms/req | producer CPU ms/req |",
             "|---|---|---:|---:|---:|---:|"]
    for system, r in results["systems"].items():
        for kind in STREAMS:
            s = r[kind]
            lines.append(f"| {system} | {kind} | {s['throughput']:.0f} | {s['loads'] / (s['n'] + s['warm']):.2f} | "
                         f"{s['worker_cpu_ms_per_req']:.2f} | {s['producer_cpu_ms_per_req']:.2f} |")
    lines.append("")
    for system, r in results["systems"].items():
        cost = per_load(r)
        lines.append(f"- {system}: a load costs its worker {cost:.2f} ms of CPU" if cost is not None
                     else f"- {system}: no loads to measure")
    mesh = results["systems"].get("mesh")
    if mesh:
        churn, one = mesh["churn"]["worker_threads_cpu_ms_per_req"], mesh["one"]["worker_threads_cpu_ms_per_req"]
        lines += ["", "| mesh worker thread | churn ms/req | one ms/req |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.3f} | {one.get(name, 0.0):.3f} |" for name, ms in churn.items() if ms >= 0.005]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench loadcost", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per stream and system")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--only", choices=("plain", "mesh"), help="run one system only (development)")
    args = ap.parse_args(argv)
    results: dict = {"command": command_line("loadcost", argv), "machine": machine(), "systems": {}}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-lc-") as tmp, redis_for_bench(Path(tmp)) as url:
        tmpdir, logs = Path(tmp), Path(tmp) / "logs"
        logs.mkdir()
        src = train_digits_mlp(tmpdir / "mlp256.joblib", hidden=(256,))
        size = int(measure_model(src)["size_bytes"])
        ids = model_ids(200)
        models = tmpdir / "models"
        copy_models(src, models, ids)
        for system in ("plain", "mesh"):
            if args.only and system != args.only:
                continue
            results["systems"][system] = {}
            for i, kind in enumerate(STREAMS):
                warm = streams(kind, ids, 20 * CLIENTS, args.seed + 100 + i)
                measured = streams(kind, ids, args.requests, args.seed + i)
                if system == "plain":
                    out = closedloop.bench_plain(url, "zipf", models, logs, warm, measured)
                else:
                    out = closedloop.bench_mesh(url, "zipf", models, logs, warm, measured, ids, size)
                out["warm"] = sum(map(len, warm))  # the loads count the warm-up's too
                results["systems"][system][kind] = out
                print(f"   {system}, {kind}: {out['throughput']:.0f} req/s, worker CPU "
                      f"{out['worker_cpu_ms_per_req']:.2f} ms/req, {out['loads']} loads", flush=True)
    print()
    print(report(results))
    print(f"\nraw figures: {save('loadcost', results)}")
    return 0
