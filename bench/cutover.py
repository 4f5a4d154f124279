"""`./scripts/bench cutover`: a vmodel retarget under load.

Two mesh workers; vmodel `v` -> model `m1` (loaded), model `m2` registered but not loaded (two
copies of one model file). Two producer processes keep `--window` requests outstanding to
`vmodel_id="v"` for `--duration` seconds; after `--switch-at` seconds the bench calls
`client.set_vmodel("v", "m2")` and polls the vmodel until `m2` is active. The mesh loads `m2`
while `m1` keeps serving, then switches (docs/vmodels.md).

Each request is put in a phase by the time it was sent: before the set_vmodel call, during the
transition (set_vmodel called, m2 not active yet), after. Reported per phase: requests, failed
(target: 0), which model answered, latency p50/p99, throughput.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import (
    Producers,
    Sender,
    clean,
    command_line,
    latency_summary,
    machine,
    redis_for_bench,
    save,
)
from bench.multimodel import copy_models, model_factories
from mesh import MeshClient, ModelInfo
from mesh.models import VModelState
from mesh.tools.examples import seed_digits_tensor
from mesh.tools.launcher import start_worker, wait_for, wait_worker_ready


def vmodel_sender(params: dict) -> Sender:
    client = MeshClient(redis_url=params["url"], prefix=params["prefix"])
    request = [seed_digits_tensor()]
    return Sender(lambda vmodel_id: client.infer(vmodel_id=vmodel_id, inputs=request),
                  lambda v: v["model_name"], client.close)


AROUND_S = 0.5  # the "around the switch" row: sent from 0.5 s before set_vmodel to 0.5 s after the switch


def phases(records: list, t_set: float, t_switched: float) -> dict:
    out = {}
    for name, lo, hi in (("before", -float("inf"), t_set), ("during", t_set, t_switched),
                         ("after", t_switched, float("inf")),
                         ("around", t_set - AROUND_S, t_switched + AROUND_S)):
        rs = [r for r in records if lo <= r.sent < hi]
        ok = [r for r in rs if r.error is None]
        span = (max(r.done for r in rs) - min(r.sent for r in rs)) if rs else 0.0
        out[name] = {"requests": len(rs), "failed": len(rs) - len(ok),
                     "errors": sorted(Counter(r.error for r in rs if r.error).items())[:5],
                     "answered_by": dict(sorted(Counter(r.info for r in ok).items())),
                     "throughput": len(ok) / span if span > 0 else 0.0,
                     **{k: v for k, v in latency_summary([r.latency for r in ok]).items() if k != "n"}}
    return out


def report(r: dict) -> str:
    lines = [f"set_vmodel call to m2 active: {r['switch_ms']:.0f} ms (set_vmodel itself returned in "
             f"{r['set_vmodel_ms']:.0f} ms)", "",
             "| phase (by send time) | requests | failed | answered by | p50 ms | p99 ms | throughput (req/s) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name in ("before", "during", "after", "around"):
        p = r["phases"][name]
        by = ", ".join(f"{m}: {n}" for m, n in p["answered_by"].items()) or "-"
        label = {"during": "during (set_vmodel called, m2 not active yet)",
                 "around": f"around the switch (+-{AROUND_S:g} s)"}.get(name, name)
        lines.append(f"| {label} | {p['requests']} | {p['failed']} | {by} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                     f"{p['throughput']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench cutover", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gb", help="gb (default), svm, mlp256 or mlp2048")
    ap.add_argument("--window", type=int, default=16, help="requests kept outstanding (two producers)")
    ap.add_argument("--duration", type=float, default=9.0, help="seconds of load")
    ap.add_argument("--switch-at", type=float, default=3.0, help="seconds into the load")
    args = ap.parse_args(argv)

    results: dict = {"command": command_line("cutover", argv), "machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-cut-") as tmp:
        tmpdir = Path(tmp)
        src = model_factories()[args.model](tmpdir)
        copy_models(src, tmpdir / "models", ["m1", "m2", "warm"])
        with redis_for_bench(tmpdir) as url:
            prefix = f"benchcut{time.monotonic_ns()}"
            env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}
            procs = [start_worker(f"cut{i}", env, tmpdir / "logs", loglevel="WARNING") for i in (1, 2)]
            client = MeshClient(redis_url=url, prefix=prefix)
            try:
                for p in procs:
                    wait_worker_ready(url, prefix, p.full_name, timeout=60, proc=p)
                for m in ("m1", "m2", "warm"):
                    client.register_model(m, ModelInfo(runtime="sklearn", uri=f"file://{tmpdir / 'models' / f'{m}.joblib'}"))
                # A worker's first load of a model type imports its modules (~1 s for sklearn's
                # ensembles): not what a cutover costs. Both workers load one such model first
                # (m1 on one, "warm" on the other, which is then left empty for m2).
                client.ensure_loaded("m1", sync=True, timeout=60)
                # placement reads heartbeats: wait until they show m1, so "warm" goes elsewhere
                wait_for(lambda: any(m.model_id == "m1" for w in client.list_workers() for m in w.models),
                         timeout=30, what="a heartbeat with m1")
                client.ensure_loaded("warm", sync=True, timeout=60)
                client.unregister_model("warm")
                wait_for(lambda: all(not w.models or [m.model_id for m in w.models] == ["m1"]
                                     for w in client.list_workers()), timeout=30, what="warm to be unloaded")
                client.set_vmodel("v", "m1", sync=True, timeout=60)
                with Producers("bench.cutover:vmodel_sender", {"url": url, "prefix": prefix}) as producers:
                    n = int(args.duration * 3000)  # more than can be answered: the duration bounds it
                    start = producers.start([["v"] * n] * producers.processes, args.window // producers.processes,
                                            duration=args.duration)
                    time.sleep(max(0.0, start + args.switch_at - time.monotonic()))
                    t_set = time.monotonic()
                    client.set_vmodel("v", "m2")
                    t_returned = time.monotonic()
                    while True:
                        status = client.get_vmodel_status("v")
                        if status.status is VModelState.DEFINED and status.active_model_id == "m2":
                            break
                        if time.monotonic() - t_set > 60:
                            raise TimeoutError(f"vmodel v did not switch to m2 in 60 s: {status}")
                        time.sleep(0.005)
                    t_switched = time.monotonic()
                    records = [r for part in producers.results() for r in part]
            finally:
                client.close()
                for p in procs:
                    p.stop()
                clean(url, prefix)
    results["set_vmodel_ms"] = (t_returned - t_set) * 1e3
    results["switch_ms"] = (t_switched - t_set) * 1e3
    results["phases"] = phases(records, t_set, t_switched)
    results["failed_total"] = sum(1 for r in records if r.error is not None)
    print(report(results))
    out = save("cutover", results)
    print(f"\nraw figures: {out}")
    return 0
