"""`./scripts/bench soak [--minutes 10]`: long mixed traffic with models churning in and out.

Two workers (each with room for about two models), celery beat, several models and a vmodel
whose target is replaced (auto-deleted) every `--churn-s` seconds, from producer threads that
keep a window of requests outstanding: single requests to a hot set of models that moves every
`--phase-s` seconds (so copies are evicted and loaded all the time), infer_many messages,
vmodel requests and a few malformed requests (which must fail, alone, with InvalidInput);
and, beside them, hostile messages pushed raw onto the queues (`--hostile`, 1% of the
requests by default; bench/hostile.py): no worker may die, and every one whose task id is
readable must be answered.

It reports (stdout, and bench/results/soak.json):
- every request's outcome: answered, failed as expected, failed otherwise, still PENDING;
- worker RSS (VmRSS from /proc/<pid>/status) before traffic, after the warm-up (every model
  loaded at least once: the baseline) and at the end, with the growth over the baseline;
- the Redis keys under the mesh's prefix by kind and type, before traffic and once traffic
  has stopped and every result has expired (MESH_RESULT_EXPIRES_S is short here), and what
  is left that should not be.

Redis is a private embedded server unless `--redis-url` is given (keys are counted under the
run's prefix either way). The machine may be shared: throughput is not the point here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from celery.result import AsyncResult

from mesh import BatchingConfig, MeshClient, ModelInfo
from mesh.errors import InvalidInput
from mesh.models import VModelState
from mesh.protocol.keys import Keys
from bench.hostile import catalogue
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.examples import (
    SEED_DIGITS_ANSWER,
    seed_digits_tensor,
    train_digits_mlp,
    train_digits_svm,
)
from mesh.tools.launcher import (
    REPO_ROOT,
    Proc,
    start_beat,
    start_worker,
    wait_for,
    wait_worker_ready,
)

RESULTS = REPO_ROOT / "bench" / "results"
GOOD = [seed_digits_tensor()]
BAD = [{"name": "predict", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]
RESULT_WAIT_S = 120.0  # a request not answered within this is reported as PENDING


# ---------------------------------------------------------------------- measurements
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def key_kinds(r: redis.Redis, prefix: str) -> dict[str, Counter]:
    """Keys under the prefix by kind (what they are for) -> Counter of Redis types."""
    keys = Keys(prefix)
    p = re.escape(prefix)
    kinds = [
        ("results", rf"^{p}:celery-task-meta-"),
        ("queue bindings", rf"^{p}:_kombu\.binding"),
        ("model queues", rf"^{p}:{p}\.model\."),
        ("worker queues", rf"^{p}:{p}\.worker\."),
        ("control queue", rf"^{p}:{p}\.control"),
        ("unacked", rf"^{p}:unacked"),
        ("heartbeats", rf"^{re.escape(keys.worker_key_prefix)}"),
        ("per-model records", rf"^{p}:(copies|failures|loadclaim|vmlock|vmdirty):"),
        ("registry", rf"^{p}:(models|vmodels|transitions|draining|usage|workers)$"),
        ("scheduler", rf"^{p}:(rebalance|repository):"),
    ]
    out: dict[str, Counter] = {}
    for raw in r.scan_iter(match=f"{prefix}[:.]*", count=1000):
        key = raw.decode("utf-8", "replace")
        kind = next((name for name, rx in kinds if re.match(rx, key)), "other")
        out.setdefault(kind, Counter())[r.type(raw).decode()] += 1
    return out


def per_model_ids(r: redis.Redis, prefix: str) -> set[str]:
    ids = set()
    for kind in ("copies", "failures", "loadclaim"):
        for raw in r.scan_iter(match=f"{prefix}:{kind}:*", count=1000):
            ids.add(raw.decode().split(":", 2)[2])
    return ids


def flat(kinds: dict[str, Counter]) -> dict[str, int]:
    return {f"{kind} ({t})": n for kind, c in sorted(kinds.items()) for t, n in sorted(c.items())}


# ---------------------------------------------------------------------- traffic
class Producer(threading.Thread):
    """A closed loop: keeps `window` requests outstanding, each to a target picked by `pick`."""

    def __init__(self, client: MeshClient, pick, window: int, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.client, self.pick, self.window, self.stop_event = client, pick, window, stop
        self.rng = random.Random(seed)
        self.outcomes: Counter = Counter()
        self.errors: Counter = Counter()

    def send(self) -> tuple[str, Any]:
        kind, target = self.pick(self.rng)
        c = self.client
        if kind == "model":
            return kind, c.infer(model_id=target, inputs=GOOD)
        if kind == "vmodel":
            return kind, c.infer(vmodel_id=target, inputs=GOOD)
        if kind == "many":
            return kind, c.infer_many(model_id=target, inputs=[GOOD] * 8)
        return kind, c.infer(model_id=target, inputs=BAD)

    def settle(self, kind: str, handle: Any) -> None:
        try:
            out = handle.get(timeout=RESULT_WAIT_S)
        except InvalidInput:
            self.outcomes["failed as expected" if kind == "bad" else "failed"] += 1
            return
        except TimeoutError:
            self.outcomes["pending"] += 1
            return
        except Exception as exc:  # counted and shown
            self.outcomes["failed"] += 1
            self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            return
        if kind == "many":
            ok = all(item["outputs"][0]["data"] == [SEED_DIGITS_ANSWER] for item in out["results"])
            self.outcomes["answered" if ok else "wrong"] += 8 if ok else 1
        elif kind == "bad":
            self.outcomes["wrong"] += 1  # a malformed request must not succeed
        else:
            self.outcomes["answered" if out["outputs"][0]["data"] == [SEED_DIGITS_ANSWER] else "wrong"] += 1

    def run(self) -> None:
        inflight: deque = deque()
        while not self.stop_event.is_set() or inflight:
            while not self.stop_event.is_set() and len(inflight) < self.window:
                try:
                    inflight.append(self.send())
                except Exception as exc:  # a send refused (e.g. a vmodel mid-cutover): counted
                    self.outcomes["send refused"] += 1
                    self.errors[f"send: {type(exc).__name__}: {str(exc)[:120]}"] += 1
                    break
            if inflight:
                self.settle(*inflight.popleft())
            else:
                self.stop_event.wait(0.01)


class Churn(threading.Thread):
    """Points the vmodel `live` at a new auto-deleted model every `every_s` seconds."""

    def __init__(self, client: MeshClient, paths: list[Path], every_s: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.paths, self.every_s, self.stop_event = client, paths, every_s, stop
        self.version = 1
        self.errors: Counter = Counter()

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            self.version += 1
            path = self.paths[self.version % len(self.paths)]
            try:
                self.client.set_vmodel("live", f"live_{self.version}", model_info=info(path),
                                       auto_delete_target_model=True)  # fmt: skip
            except Exception as exc:  # reported
                self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1


class Hostility(threading.Thread):
    """Pushes hostile messages raw (bench/hostile.py) at `fraction` of the producers' rate, and
    checks that every owed answer arrives (a result record, typed error or not)."""

    def __init__(self, client: MeshClient, url: str, ids: list[str], producers: list[Producer],
                 fraction: float, stop: threading.Event) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.client, self.ids, self.producers, self.fraction, self.stop_event = client, ids, producers, fraction, stop
        self.r = redis.Redis.from_url(url)
        self.rng = random.Random(7)
        self.sent: Counter = Counter()
        self.answered: Counter = Counter()
        self.unanswered: Counter = Counter()
        self._lock = threading.Lock()
        self._checks = ThreadPoolExecutor(4, thread_name_prefix="hostile-check")
        self._pending: list = []

    def _requests(self) -> int:
        return sum(sum(p.outcomes.values()) for p in self.producers)

    def _check(self, kind: str, task_id: str) -> None:
        try:
            AsyncResult(task_id, app=self.client.app).get(timeout=60, propagate=False)
            outcome = self.answered
        except Exception:  # a timeout: the answer owed never came
            outcome = self.unanswered
        with self._lock:
            outcome[kind] += 1

    def run(self) -> None:
        by_model = {m: [build for _kind, build in catalogue(self.client.keys, m, GOOD)] for m in self.ids}
        while not self.stop_event.wait(0.05):
            while sum(self.sent.values()) < self.fraction * self._requests():
                h = self.rng.choice(by_model[self.rng.choice(self.ids)])(self.rng)
                with self.r.pipeline(transaction=False) as pipe:
                    pipe.lpush(h.list_key, h.raw)
                    pipe.lpush(h.bell_key, 1)
                    pipe.execute()
                self.sent[h.kind] += 1
                if h.answer_id is not None:
                    self._pending.append(self._checks.submit(self._check, h.kind, h.answer_id))

    def finish(self) -> dict:
        for f in self._pending:
            f.result()
        self._checks.shutdown()
        self.r.close()
        return {"sent": dict(self.sent), "answered": dict(self.answered), "unanswered": dict(self.unanswered)}


def info(path: Path) -> ModelInfo:
    return ModelInfo(runtime="sklearn", uri=f"file://{path}",
                     batching=BatchingConfig(max_batch_size=16, max_batch_delay_ms=2))  # fmt: skip


# ---------------------------------------------------------------------- the run
def run(args: argparse.Namespace, tmp: Path) -> dict:
    embedded = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis(tmp / "redis")
        url = embedded.start(timeout=20)
    prefix = f"soak{os.getpid()}"
    procs: list[Proc] = []
    client = None
    r = redis.Redis.from_url(url)
    try:
        # models: copies of two trained digits models at distinct paths (distinct models)
        svm, mlp = train_digits_svm(tmp / "svm.joblib"), train_digits_mlp(tmp / "mlp.joblib")
        paths = []
        for i in range(args.models):
            path = tmp / "models" / f"m{i}.joblib"
            path.parent.mkdir(exist_ok=True)
            shutil.copy(svm if i % 2 else mlp, path)
            paths.append(path)
        from workers.runtimes import get_runtime

        size = max(get_runtime("sklearn").load(p, info(p)).size_bytes for p in (svm, mlp))
        capacity = int(size * args.capacity_models + size // 4)
        env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix, "MESH_WORKER_CAPACITY_BYTES": str(capacity),
               "MESH_RESULT_EXPIRES_S": str(args.result_expires)}  # fmt: skip
        logs = tmp / "logs"
        for i in range(args.workers):
            procs.append(start_worker(f"soak{i + 1}", env, logs, loglevel="WARNING"))
        for proc in procs:
            wait_worker_ready(url, prefix, proc.full_name, timeout=60, proc=proc)
        procs.append(start_beat(env, logs))
        workers = [p for p in procs if p.full_name]

        client = MeshClient(redis_url=url, prefix=prefix)
        ids = [f"m{i}" for i in range(args.models)]
        for model_id, path in zip(ids, paths):
            client.register_model(model_id, info(path))
        client.set_vmodel("live", "live_1", model_info=info(paths[0]), auto_delete_target_model=True)
        rss_before = {p.full_name: rss_bytes(p.pid) for p in workers}
        keys_before = key_kinds(r, prefix)

        started = time.monotonic()
        hot: list[str] = []

        def pick(rng: random.Random) -> tuple[str, str]:
            phase = int((time.monotonic() - started) // args.phase_s)
            hot[:] = [ids[phase % len(ids)], ids[(phase + 1) % len(ids)]]
            x = rng.random()
            if x < 0.01:
                return "bad", rng.choice(ids)
            if x < 0.11:
                return "vmodel", "live"
            if x < 0.21:
                return "many", rng.choice(hot)
            return "model", rng.choice(hot) if rng.random() < 0.8 else rng.choice(ids)

        stop = threading.Event()
        producers = [Producer(client, pick, args.window, stop, seed=i) for i in range(args.producers)]
        churn = Churn(client, paths, args.churn_s, stop)
        hostility = Hostility(client, url, ids, producers, args.hostile, stop)
        for t in (*producers, churn, hostility):
            t.start()
        duration = args.minutes * 60
        warmup = min(60.0, duration * 0.2)
        samples = []
        baseline = None
        while (elapsed := time.monotonic() - started) < duration:
            time.sleep(min(args.sample_s, max(0.0, duration - elapsed)))
            sample = {"t": round(time.monotonic() - started, 1),
                      "rss": {p.full_name: rss_bytes(p.pid) for p in workers if p.alive()},
                      "redis_keys": sum(1 for _ in r.scan_iter(match=f"{prefix}[:.]*", count=1000)),
                      "answered": sum(p.outcomes["answered"] for p in producers)}  # fmt: skip
            samples.append(sample)
            if baseline is None and sample["t"] >= warmup:
                baseline = sample["rss"]
            print(f"  t={sample['t']:.0f}s answered={sample['answered']} rss(MB)="
                  + ",".join(f"{v / 2**20:.0f}" for v in sample["rss"].values())
                  + f" keys={sample['redis_keys']}", flush=True)
        stop.set()
        for t in (*producers, churn, hostility):
            t.join(timeout=RESULT_WAIT_S + 60)
        hostile = hostility.finish()
        traffic_s = time.monotonic() - started
        rss_end = {p.full_name: rss_bytes(p.pid) for p in workers if p.alive()}
        alive = {p.full_name: p.alive() for p in workers}

        # the last cutover completes, then every result expires
        wait_for(lambda: client.get_vmodel_status("live").status is not VModelState.TRANSITIONING, 120,
                 interval=0.5, what="the last vmodel cutover")  # fmt: skip
        steps = list(client.app.conf.broker_transport_options.get("priority_steps", [0]))
        depths = {m: client.store.queue_depth(m, steps) for m in [*ids, *(x.model_id for x in client.list_models())]}
        unacked = r.hlen(client.keys.kombu_prefix + "unacked")
        time.sleep(args.result_expires + 10)
        keys_after = key_kinds(r, prefix)
        bindings_after = sorted(k.decode()[len(prefix) + 1:] for k in r.scan_iter(match=f"{prefix}:_kombu.binding*", count=1000))
        registered = {x.model_id for x in client.list_models()}
        stale_records = sorted(per_model_ids(r, prefix) - registered)

        outcomes: Counter = Counter()
        errors: Counter = Counter()
        for p in producers:
            outcomes.update(p.outcomes)
            errors.update(p.errors)
        base = baseline or rss_before
        return {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_avg_end": os.getloadavg()},
            "args": vars(args),
            "capacity_bytes": capacity,
            "model_bytes": size,
            "traffic_s": round(traffic_s, 1),
            "outcomes": dict(outcomes),
            "errors": dict(errors.most_common(10)),
            "churn": {"versions": churn.version, "errors": dict(churn.errors)},
            "hostile": hostile,
            "workers_alive": alive,
            "worker_pids": {p.full_name: p.pid for p in workers},
            "rss": {name: rss_figures(name, rss_before, base, rss_end, samples) for name in rss_before},
            "queue_depth_after": {m: d for m, d in depths.items() if d},
            "unacked_after": unacked,
            "keys_before_traffic": flat(keys_before),
            "keys_after_expiry": flat(keys_after),
            "registered_after": sorted(registered),
            "binding_keys_after": bindings_after[:200],
            "per_model_records_of_unregistered_models": stale_records,
            "samples": samples,
        }
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):
            proc.stop()
        r.close()
        if embedded is not None:
            embedded.stop()


def rss_figures(name: str, before: dict, warm: dict, end: dict, samples: list[dict]) -> dict:
    growth = end[name] / warm[name] - 1 if name in end and warm.get(name) else None
    return {"before_traffic": before[name], "after_warmup": warm.get(name), "end": end.get(name),
            "max": max(s["rss"].get(name, 0) for s in samples), "growth_vs_warmup": growth}  # fmt: skip


def report(res: dict) -> str:
    o = res["outcomes"]
    sent = sum(o.values())
    lines = [
        (f"soak: {res['traffic_s']:.0f} s of traffic, {res['args']['workers']} workers (capacity "
         f"{res['capacity_bytes'] / 2**20:.1f} MB, models of ~{res['model_bytes'] / 2**20:.1f} MB), "
         f"{res['args']['models']} models + a vmodel re-targeted {res['churn']['versions'] - 1} times"),
        "",
        "| outcome | requests |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(o.items())),
        f"| total | {sent} |",
        "",
        "| worker | RSS before traffic | after warm-up | end | max | end vs warm-up |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, x in res["rss"].items():
        growth = x["growth_vs_warmup"]
        lines.append(
            f"| {name} | {x['before_traffic'] / 2**20:.1f} MB | {(x['after_warmup'] or 0) / 2**20:.1f} MB | "
            f"{(x['end'] or 0) / 2**20:.1f} MB | {x['max'] / 2**20:.1f} MB | "
            f"{'n/a' if growth is None else f'{growth:+.1%}'} |"
        )
    h = res["hostile"]
    lines += ["", "| hostile message | pushed | answer owed: answered | owed, never answered |", "|---|---|---|---|"]
    for kind, n in sorted(h["sent"].items()):
        lines.append(f"| {kind} | {n} | {h['answered'].get(kind, '-')} | {h['unanswered'].get(kind, 0)} |")
    before, after = res["keys_before_traffic"], res["keys_after_expiry"]
    lines += ["", "| Redis keys under the prefix | before traffic | after traffic + result expiry |", "|---|---|---|"]
    for k in sorted(set(before) | set(after)):
        lines.append(f"| {k} | {before.get(k, 0)} | {after.get(k, 0)} |")
    lines += [
        "",
        (f"queues not empty after traffic: {res['queue_depth_after'] or 'none'}; "
         f"unacked messages: {res['unacked_after']}; per-model records of unregistered models: "
         f"{res['per_model_records_of_unregistered_models'] or 'none'}; workers alive: "
         f"{all(res['workers_alive'].values())}"),
    ]
    if res["errors"] or res["churn"]["errors"]:
        lines += ["", f"errors: {json.dumps(res['errors'])} churn errors: {json.dumps(res['churn']['errors'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--capacity-models", type=float, default=2.0, help="worker capacity, in models")
    ap.add_argument("--producers", type=int, default=3, help="producer threads")
    ap.add_argument("--window", type=int, default=16, help="requests outstanding per producer")
    ap.add_argument("--phase-s", type=float, default=20.0, help="how often the hot models change")
    ap.add_argument("--churn-s", type=float, default=30.0, help="how often the vmodel gets a new model")
    ap.add_argument("--result-expires", type=int, default=20, help="MESH_RESULT_EXPIRES_S of the run")
    ap.add_argument("--sample-s", type=float, default=15.0, help="RSS/keys sampling interval")
    ap.add_argument("--hostile", type=float, default=0.01, help="hostile messages per request sent")
    ap.add_argument("--redis-url", default=None, help="default: a private embedded redis-server")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-soak-") as tmp:
        res = run(args, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(report(res))
    o = res["outcomes"]
    ok = (not (o.get("failed") or o.get("pending") or o.get("wrong") or res["hostile"]["unanswered"])
          and all(res["workers_alive"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
