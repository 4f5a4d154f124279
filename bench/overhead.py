"""`./scripts/bench overhead`: where the time of one request goes, mesh vs plain Celery.

One worker process each (a mesh worker; a plain Celery worker running bench/plain_multi.py's
task), one model loaded, one request at a time. Every part is the median over `--requests`
requests of a difference of wall-clock timestamps (time.time(), one machine, so one clock):

| part | from -> to | mesh | plain Celery |
|---|---|---|---|
| enqueue | client call -> the call returns (mesh: also "of which routing", up to the `mesh-sent-at` stamp) | `MeshClient.infer`: routing (vmodel/copy check, one Lua call) + `send_task` (result SUBSCRIBE + LPUSH) | `send_task` |
| queue wait | call returned -> worker took the message | `task-received` event (sent by the worker's Strategy as it takes the message) | `task-received` event |
| batch wait / dispatch | worker took it -> predict starts | buffer, inference thread wakes, decode; predict start = the `mesh-sent-at` header + `mesh_request_queue_seconds` | pool dispatch, task start, decode; timestamp inside the task |
| predict | predict start -> end | `mesh_request_compute_seconds` | timestamps inside the task |
| result store | predict end -> result written | outputs encoded, result meta built (its `date_done`) | same, by Celery's `mark_as_done` |
| result delivery | `date_done` -> the client has it | SET + PUBLISH, pub/sub, client decode | same |

The worker-side histograms are read from the mesh worker's /metrics after each request (their
per-model `_sum` grows by exactly that request's value). `date_done` is the result meta's
timestamp, taken just before the result is written to Redis.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from celery import signals

from bench.common import (
    clean,
    command_line,
    machine,
    metric_sum,
    percentile,
    plain_producer,
    redis_for_bench,
    save,
    scrape,
    start_plain_worker,
)
from bench.multimodel import copy_models, model_factories
from mesh import MeshClient, ModelInfo
from mesh.protocol.messages import SENT_AT_HEADER
from mesh.tools.examples import seed_digits_tensor
from mesh.tools.launcher import free_port, start_worker, wait_for, wait_worker_ready

PARTS = ("enqueue", "queue_wait", "batch_wait", "predict", "result_store", "result_delivery")


class EventLog:
    """Timestamps of the `task-received` events of one Celery app's workers, by task id."""

    def __init__(self, app) -> None:
        self.received: dict[str, float] = {}
        self._app = app
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-events")
        self._thread.start()

    def _run(self) -> None:
        def on_received(event: dict) -> None:
            self.received.setdefault(event["uuid"], event["timestamp"])

        with self._app.connection_for_read() as conn:
            recv = self._app.events.Receiver(conn, handlers={"task-received": on_received, "*": lambda e: None})
            recv.capture(limit=None, timeout=None, wakeup=False)

    def wait(self, task_id: str, timeout: float = 10.0) -> float:
        return wait_for(lambda: self.received.get(task_id), timeout=timeout, interval=0.001,
                        what=f"the task-received event of {task_id}")


_SENT_AT: dict[str, float] = {}


@signals.before_task_publish.connect(weak=False)
def _remember_sent_at(sender=None, headers=None, **kwargs) -> None:
    if headers and SENT_AT_HEADER in headers:
        _SENT_AT[headers["id"]] = float(headers[SENT_AT_HEADER])


def _date_done(handle) -> float:
    dd = handle.date_done
    if dd.tzinfo is None:  # Celery stores UTC
        from datetime import timezone

        dd = dd.replace(tzinfo=timezone.utc)
    return dd.timestamp()


def measure_mesh(client: MeshClient, port: int, events: EventLog, n: int) -> list[dict]:
    rows = []
    request = [seed_digits_tensor()]
    count = "mesh_request_queue_seconds_count"
    for _ in range(n):
        before = scrape(port)
        c0 = time.time()
        handle = client.infer(model_id="m", inputs=request)
        c1 = time.time()
        handle.get(timeout=30)
        c2 = time.time()
        after = wait_for(lambda: (s := scrape(port)) and metric_sum(s, count, model="m") > metric_sum(before, count, model="m")
                         and s, timeout=10, interval=0.002, what="the request's metrics")
        queue_s = metric_sum(after, "mesh_request_queue_seconds_sum", model="m") - metric_sum(
            before, "mesh_request_queue_seconds_sum", model="m")
        compute_s = metric_sum(after, "mesh_request_compute_seconds_sum", model="m") - metric_sum(
            before, "mesh_request_compute_seconds_sum", model="m")
        received = events.wait(handle.id)
        sent_at = _SENT_AT.pop(handle.id)
        started = sent_at + queue_s
        done = _date_done(handle)
        rows.append({"enqueue": c1 - c0, "enqueue_routing": sent_at - c0, "queue_wait": received - c1, "batch_wait": started - received,
                     "predict": compute_s, "result_store": done - (started + compute_s),
                     "result_delivery": c2 - done, "total": c2 - c0})
    return rows


def measure_plain(app, events: EventLog, n: int) -> list[dict]:
    rows = []
    request = [seed_digits_tensor()]
    for _ in range(n):
        c0 = time.time()
        handle = app.send_task("plain_multi.predict", args=["m", request])
        c1 = time.time()
        value = handle.get(timeout=30)
        c2 = time.time()
        received = events.wait(handle.id)
        t = value["t"]
        done = _date_done(handle)
        rows.append({"enqueue": c1 - c0, "queue_wait": received - c1, "batch_wait": t["predict"] - received,
                     "predict": t["predicted"] - t["predict"], "result_store": done - t["predicted"],
                     "result_delivery": c2 - done, "total": c2 - c0})
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {part: statistics.median(r[part] for r in rows) * 1e3 for part in (*PARTS, "enqueue_routing")
           if part in rows[0]}
    totals = [r["total"] for r in rows]
    out.update(total_p50=percentile(totals, 0.5) * 1e3, total_p99=percentile(totals, 0.99) * 1e3,
               total_mean=statistics.fmean(totals) * 1e3, sum_of_medians=sum(out[p] for p in PARTS), n=len(rows))
    return out


def report(r: dict) -> str:
    labels = {"enqueue": "enqueue (client call)", "queue_wait": "queue wait (to the worker's intake)",
              "batch_wait": "batch wait (mesh) / dispatch (plain): intake to predict",
              "predict": "predict", "result_store": "result store (predict end to date_done)",
              "result_delivery": "result delivery (date_done to the client)"}
    m, p = r["mesh"], r["plain"]
    lines = ["| part (median ms) | mesh | plain Celery |", "|---|---:|---:|"]
    for part in PARTS:
        lines.append(f"| {labels[part]} | {m[part]:.3f} | {p[part]:.3f} |")
        if part == "enqueue":
            lines.append(f"| - of which routing, before the send (mesh) | {m['enqueue_routing']:.3f} | |")
    lines.append(f"| **end to end, p50** | **{m['total_p50']:.2f}** | **{p['total_p50']:.2f}** |")
    lines.append(f"| end to end, p99 | {m['total_p99']:.2f} | {p['total_p99']:.2f} |")
    lines.append(f"| end to end, mean | {m['total_mean']:.2f} | {p['total_mean']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="svm", help="svm (default), gb, mlp256 or mlp2048")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    args = ap.parse_args(argv)

    results: dict = {"command": command_line("overhead", argv), "machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-over-") as tmp:
        tmpdir = Path(tmp)
        src = model_factories()[args.model](tmpdir)
        copy_models(src, tmpdir / "models", ["m"])
        path = tmpdir / "models" / "m.joblib"
        with redis_for_bench(tmpdir) as url:
            # mesh
            prefix = f"benchover{time.monotonic_ns()}"
            port = free_port()
            proc = start_worker("over", {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix, "MESH_METRICS_PORT": port},
                                tmpdir / "logs", loglevel="WARNING")
            client = MeshClient(redis_url=url, prefix=prefix)
            try:
                wait_worker_ready(url, prefix, proc.full_name, timeout=60, proc=proc)
                client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{path}"))
                client.ensure_loaded("m", sync=True, timeout=60)
                events = EventLog(client.app)
                # the first events may be published before the receiver listens
                wait_for(lambda: _answered_with_event(lambda: client.infer(model_id="m", inputs=[seed_digits_tensor()]),
                                                      events), timeout=60, what="the event receiver")
                measure_mesh(client, port, events, args.warmup)
                results["mesh"] = summarize(measure_mesh(client, port, events, args.requests))
            finally:
                client.close()
                proc.stop()
                clean(url, prefix)
            print(f"   mesh:  p50 {results['mesh']['total_p50']:.2f} ms", flush=True)
            # plain Celery
            prefix = f"benchoverplain{time.monotonic_ns()}"
            proc = start_plain_worker("bench.plain_multi", "overplain", url, prefix,
                                      {"BENCH_MODEL_DIR": str(tmpdir / "models")}, tmpdir / "logs")
            app = plain_producer(url, prefix)
            try:
                events = EventLog(app)
                wait_for(lambda: _answered_with_event(
                    lambda: app.send_task("plain_multi.predict", args=["m", [seed_digits_tensor()]]), events),
                    timeout=60, what="the plain worker and the event receiver")
                measure_plain(app, events, args.warmup)
                results["plain"] = summarize(measure_plain(app, events, args.requests))
            finally:
                proc.stop()
                clean(url, prefix)
            print(f"   plain: p50 {results['plain']['total_p50']:.2f} ms", flush=True)
    print()
    print(report(results))
    out = save("overhead", results)
    print(f"\nraw figures: {out}")
    return 0


def _answered_with_event(send, events: EventLog) -> bool:
    """One request answered and its task-received event seen (the receiver is listening)."""
    try:
        handle = send()
        handle.get(timeout=5)
    except Exception:  # the worker is still starting
        return False
    # the event trails the result by a little: give it a bounded moment, not a fixed one
    deadline = time.monotonic() + 0.5
    while handle.id not in events.received and time.monotonic() < deadline:
        time.sleep(0.01)
    return handle.id in events.received
