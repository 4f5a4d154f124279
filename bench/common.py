"""What every benchmark mode shares: Redis, worker processes, producers, statistics, results.

- `redis_for_bench`: the Redis to use (MESH_REDIS_URL, else 127.0.0.1:6379, else an embedded one).
- `start_plain_worker`: a plain-Celery baseline worker (bench/plain.py or bench/plain_multi.py).
- `Producers`: producer processes (spawned once, reused across runs) that keep a window of
  requests outstanding over a given request stream and record, per request, when it was sent
  and when its result arrived. A result is timed when the producer *receives* it (Celery's
  result consumer calls us back for every result message it drains), not when the producer
  gets round to waiting for it, so one slow request does not inflate the latency of the
  requests behind it.
- `scrape`: a worker's Prometheus metrics, summed by metric name and label filter.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.tools.launcher import REPO_ROOT, Proc

RESULTS = REPO_ROOT / "bench" / "results"


# ---------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def latency_summary(latencies_s: Sequence[float]) -> dict:
    """p50/p99/mean/max in milliseconds."""
    lat = list(latencies_s)
    if not lat:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan"), "max_ms": float("nan")}
    return {"n": len(lat), "p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "max_ms": max(lat) * 1e3}


def one_at_a_time(send: Callable[[], object], wait: Callable[[object], None], n: int) -> dict:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        wait(send())
        lat.append(time.perf_counter() - t0)
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "n": n}


# ---------------------------------------------------------------------- Redis and housekeeping
@contextlib.contextmanager
def redis_for_bench(tmpdir: Path) -> Iterator[str]:
    """MESH_REDIS_URL, else 127.0.0.1:6379 if it answers, else an embedded redis-server."""
    from mesh.broker.redis_url import resolve_redis_url
    from mesh.tools.embedded import EmbeddedRedis

    url = resolve_redis_url()
    if url is not None:
        yield url
        return
    embedded = EmbeddedRedis(Path(tmpdir) / "redis")
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop()


def clean(url: str, prefix: str) -> None:
    """Delete every key of a benchmark run (its prefix's keys and queues)."""
    import redis

    r = redis.Redis.from_url(url)
    for pattern in (f"{prefix}:*", f"{prefix}.*"):
        keys = list(r.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])
    r.close()


def answers(send: Callable[[], object], wait: Callable[[object], Any]) -> bool:
    try:
        wait(send())
        return True
    except Exception:  # the worker may still be starting: try again
        return False


def machine() -> dict:
    """What the figures were taken on (and how busy it was when the run started)."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}


def save(mode: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{mode}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    return out


def command_line(mode: str, argv: Sequence[str] | None) -> str:
    return " ".join(["scripts/bench", mode, *(argv if argv is not None else sys.argv[1:])])


# ---------------------------------------------------------------------- plain Celery baseline
def plain_producer(url: str, prefix: str):
    """A producer app speaking to the plain-Celery baseline workers of `prefix`."""
    from bench import plain

    app = plain.Celery("plain-producer", broker=url, backend=url)
    app.conf.update(plain.app.conf)
    app.conf.update(broker_transport_options={"global_keyprefix": f"{prefix}:"},
                    result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
                    task_default_queue=f"{prefix}.q", event_exchange=f"{prefix}.celeryev",
                    control_exchange=f"{prefix}.pidbox")
    return app


def start_plain_worker(module: str, name: str, url: str, prefix: str, env: dict, logs: Path,
                       concurrency_args: Sequence[str] = ("-P", "solo")) -> Proc:
    """`celery -A <module> worker` consuming `<prefix>.q`, with task events on (-E)."""
    full_env = {**os.environ, "MESH_REDIS_URL": url, "BENCH_PLAIN_PREFIX": prefix,
                "PYTHONPATH": str(REPO_ROOT), **env}
    return Proc(name, [sys.executable, "-m", "celery", "-A", module, "worker", *concurrency_args,
                       "-E", "--without-mingle", "--without-gossip", "-Q", f"{prefix}.q",
                       "-n", f"{name}@%h", "--loglevel", "WARNING"],
                Path(logs) / f"{name}.log", env=full_env, cwd=REPO_ROOT)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes have used (all threads; Linux /proc). On a shared
    machine, CPU per request is the figure least disturbed by the other jobs."""
    total = 0.0
    for pid in pids:
        try:
            total += _stat_cpu(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            return float("nan")
    return total


def _stat_cpu(stat: str) -> float:
    """utime + stime of a /proc stat line, in seconds (the fields after the command's `)`)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time by thread name (Linux /proc; a worker names its threads for the
    OS, workers/threadnames.py): its main thread, the Celery consumer's, as `consumer`."""
    out: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = "consumer" if tid == str(pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
        out[name] = out.get(name, 0.0) + _stat_cpu(stat)
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat), to tell how
    close to saturated the machine was during a phase."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def pooled_thread_cpu_seconds(pids: Sequence[int]) -> dict[str, float]:
    """`thread_cpu_seconds` of all the processes, a pool's numbered threads (mesh-fetch_0,
    mesh-fetch_1) as one role (mesh-fetch)."""
    out: dict[str, float] = {}
    for pid in pids:
        for name, seconds in thread_cpu_seconds(pid).items():
            role = re.sub(r"_\d+$", "", name)
            out[role] = out.get(role, 0.0) + seconds
    return out


def ms_by_thread(threads_cpu_s: dict[str, float], n: int) -> dict[str, float]:
    """CPU ms per unit (request, message) of each thread role that used any, the busiest first
    (`CpuMeter.stop()["threads_cpu_s"]`)."""
    ranked = sorted(threads_cpu_s.items(), key=lambda kv: -kv[1])
    return {name: round(1e3 * s / n, 3) for name, s in ranked if s > 0}


class CpuMeter:
    """CPU used by some processes (in all, and by thread role) and by the whole machine between
    `start()` and `stop()`. A thread that ended in between is missing from the roles."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def start(self) -> CpuMeter:
        self._procs0, self._machine0 = cpu_seconds(self.pids), machine_cpu()
        self._threads0 = pooled_thread_cpu_seconds(self.pids)
        return self

    def stop(self) -> dict:
        procs, (busy, total) = cpu_seconds(self.pids), machine_cpu()
        threads = pooled_thread_cpu_seconds(self.pids)
        busy0, total0 = self._machine0
        return {"cpu_s": procs - self._procs0,
                "threads_cpu_s": {k: v - self._threads0.get(k, 0.0) for k, v in threads.items()},
                "machine_busy": (busy - busy0) / (total - total0) if total > total0 else float("nan")}


# ---------------------------------------------------------------------- Prometheus metrics
def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """A worker's metrics: {(sample name, sorted labels): value}."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


# ---------------------------------------------------------------------- producers
@dataclass
class Record:
    """One request as its producer saw it (times: time.monotonic(), the same clock in every
    process of the machine)."""

    index: int  # position in the stream
    sent: float
    done: float
    error: str | None
    info: Any  # what the sender's `summarize` made of the result

    @property
    def latency(self) -> float:
        return self.done - self.sent


class Sender:
    """What a producer process needs: `send(item) -> AsyncResult` and `summarize(result value)`.

    Built in the producer process by a factory named "module:function" taking a params dict.
    """

    def __init__(self, send: Callable[[Any], Any], summarize: Callable[[Any], Any] = lambda v: None,
                 close: Callable[[], None] = lambda: None) -> None:
        self.send = send
        self.summarize = summarize
        self.close = close


# A producer that heard nothing this long drains again; its oldest request is read directly
# (one GET) only after SILENT_S of silence, in case a published result was missed.
DRAIN_S = 0.05
SILENT_S = 5.0


def produce(sender: Sender, items: Sequence[Any], window: int, start_at: float | None = None,
            stop_at: float | None = None, timeout: float = 300.0) -> list[Record]:
    """Closed loop over `items`: keep `window` requests outstanding; stop sending at `stop_at`.

    A request that completes is replaced at once, whichever it is: results arrive out of order
    (a hit answered while an older request waits for its model's load), and waiting for the
    oldest first would leave the window short of requests behind it, capping the throughput of
    exactly the systems that answer out of order. Each result handle gets a promise callback
    (Celery's `AsyncResult.then`); the loop reads the result backend's pub/sub messages
    (`drain_events`, every waiting message, also between sends, since an arrival is timed when
    it is read), which fulfils the promises of the results that arrived, with no polling of
    the result keys. Both systems of a benchmark use this same loop.
    """
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    ready: deque = deque()  # (task id, arrival time), in arrival order

    def on_ready(result: Any) -> None:
        ready.append((result.id, time.monotonic()))

    inflight: dict[str, tuple[int, float, Any]] = {}  # task id -> (index, sent, handle), oldest first
    out: list[Record] = []
    sent, n = 0, len(items)
    last_heard = time.monotonic()
    consumer = None

    def drain_waiting() -> None:
        """Read every result message already waiting, without blocking: one drain reads one
        message, and a result read late is recorded late and replaced late."""
        for _ in range(4 * window):
            before = len(ready)
            consumer.drain_events(timeout=0)
            if len(ready) == before:
                return

    while sent < n or inflight:
        while sent < n and len(inflight) < window:
            if stop_at is not None and time.monotonic() >= stop_at:
                n = sent
                break
            t = time.monotonic()
            try:
                handle = sender.send(items[sent])
                inflight[handle.id] = (sent, t, handle)
                handle.then(on_ready)
                consumer = handle.backend.result_consumer
            except Exception as exc:  # refused at enqueue: a failed request too
                out.append(Record(sent, t, time.monotonic(), f"{type(exc).__name__}: {exc}", None))
            sent += 1
            if consumer is not None:
                drain_waiting()  # between sends too: arrivals are timed when read
        if not inflight:
            continue
        if not ready:
            oldest = next(iter(inflight))
            _, t_oldest, handle = inflight[oldest]
            consumer.drain_events(timeout=DRAIN_S)
            drain_waiting()
            now = time.monotonic()
            if ready:
                last_heard = now
            elif now - last_heard > SILENT_S:
                last_heard = now
                try:  # a direct read (one GET), and its own wait if it is still running
                    handle.get(timeout=max(0.001, t_oldest + timeout - now), propagate=False)
                except Exception:
                    ready.append((oldest, math.inf))  # given up: recorded as failed below
            continue
        while ready:
            task_id, arrived = ready.popleft()
            if task_id not in inflight:
                continue  # fulfilled twice (a direct read raced the message)
            index, t, handle = inflight.pop(task_id)
            error, info = None, None
            try:
                if arrived == math.inf:
                    raise TimeoutError(f"no result within {timeout:g}s")
                info = sender.summarize(handle.get(timeout=timeout))  # cached: no round trip
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            out.append(Record(index, t, min(arrived, time.monotonic()), error, info))
    return out


def _producer_main(conn, factory: str, params: dict) -> None:
    module, _, func = factory.partition(":")
    sender: Sender = getattr(importlib.import_module(module), func)(params)
    conn.send(("ready", None))
    try:
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                break
            conn.send(("done", produce(sender, **args)))
    finally:
        sender.close()


class Producers:
    """`processes` producer processes (spawned: no state inherited from the bench process),
    each with a Sender built by `factory` ("module:function") from `params`.

    A Python producer's own CPU must not be what is measured, hence processes, not threads.
    """

    def __init__(self, factory: str, params: dict, processes: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self._conns = []
        self._procs = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_producer_main, args=(child, factory, params), daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        for conn, p in zip(self._conns, self._procs):
            try:
                if not conn.poll(120):
                    raise TimeoutError("a producer process did not start within 120 s")
                conn.recv()
            except (EOFError, TimeoutError) as exc:
                self.close()
                raise RuntimeError(f"producer process {p.pid} failed to start (exit code {p.exitcode}): {exc!r}; "
                                   "a script using Producers needs an `if __name__ == '__main__':` guard") from None

    @property
    def processes(self) -> int:
        return len(self._conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self, streams: Sequence[Sequence[Any]], window: int, duration: float | None = None,
              delay: float = 0.2) -> float:
        """Start one stream per producer (at most `processes`), each with `window` outstanding.
        Returns the common start time (monotonic); collect with `results()`."""
        if len(streams) > len(self._conns):
            raise ValueError(f"{len(streams)} streams for {len(self._conns)} producers")
        start_at = time.monotonic() + delay
        stop_at = start_at + duration if duration is not None else None
        self._running = len(streams)
        for conn, items in zip(self._conns, streams):
            conn.send(("run", {"items": list(items), "window": window, "start_at": start_at, "stop_at": stop_at}))
        return start_at

    def results(self) -> list[list[Record]]:
        out = []
        for conn in self._conns[: self._running]:
            kind, records = conn.recv()
            out.append(records)
        return out

    def run(self, streams: Sequence[Sequence[Any]], window: int, duration: float | None = None) -> list[list[Record]]:
        self.start(streams, window, duration)
        return self.results()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop", None))
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> Producers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Deal `items` round-robin into `parts` streams (item i goes to producer i % parts)."""
    return [list(items[i::parts]) for i in range(parts)]


def load_summary(records: Sequence[Record]) -> dict:
    """Throughput over the run (first send to last answer) and latency of the answered requests."""
    if not records:
        return {"n": 0, "throughput": 0.0}
    ok = [r for r in records if r.error is None]
    elapsed = max(r.done for r in records) - min(r.sent for r in records)
    out = {"n": len(records), "failed": len(records) - len(ok), "elapsed_s": elapsed,
           "throughput": len(ok) / elapsed if elapsed > 0 else float("nan")}
    out.update({k: v for k, v in latency_summary([r.latency for r in ok]).items() if k != "n"})
    return out
