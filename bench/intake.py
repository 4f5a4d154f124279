"""`./scripts/bench intake`: a consumer's CPU per message, by the number of queues it consumes.

A worker consumes one queue per model it holds (20 per worker in `closedloop zipf`), and under
load each poll brings it about one message. This measures that path alone, in one process:
`--messages` messages are spread over the queues beforehand, then drained through a kombu
Consumer with a prefetch of one (one message per poll), and the draining thread's CPU time is
divided by the messages. Mesh's transport (mesh/broker/transport.py: the pop script, bells)
against kombu's stock Redis transport (what plain Celery polls with), alternated `--rounds`
times, so that both see the same moments of a shared machine. No worker, no Celery.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from mesh.broker.redis_url import resolve_redis_url
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
TRANSPORTS = {"mesh": "mesh.broker.transport:Transport", "kombu": "redis"}


def drain(url: str, transport: str, queues: int, messages: int) -> dict:
    prefix = f"benchintake{uuid.uuid4().hex[:8]}:"
    options = {"global_keyprefix": prefix, "polling_interval": 0.1}
    qs = [Queue(f"q{i}", Exchange("", type="direct"), routing_key=f"q{i}") for i in range(queues)]
    got = [0]

    def on_message(body, message) -> None:
        got[0] += 1
        message.ack()

    try:
        with Connection(url, transport=transport, transport_options=options) as pub, \
                Connection(url, transport=transport, transport_options=options) as con:  # fmt: skip
            producer = Producer(pub.channel())
            for q in qs:
                q(pub.channel()).declare()
            with Consumer(con.channel(), qs, callbacks=[on_message], accept=["json"]) as consumer:
                consumer.qos(prefetch_count=1)
                for i in range(messages):
                    q = qs[i % queues]
                    producer.publish({"n": i}, exchange=q.exchange, routing_key=q.name, serializer="json")
                cpu0, t0 = time.thread_time(), time.perf_counter()
                while got[0] < messages:
                    try:
                        con.drain_events(timeout=1)
                    except TimeoutError:
                        pass
                cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
    finally:
        r = redis.Redis.from_url(url)
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)
        r.close()
    return {"cpu_us_per_msg": cpu / messages * 1e6, "wall_us_per_msg": wall / messages * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench intake", description=__doc__.splitlines()[0])
    ap.add_argument("--queues", default="1,5,20", help="comma-separated numbers of queues consumed")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3, help="alternated runs of each transport")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        url = resolve_redis_url()
        embedded = None
        if url is None:
            embedded = EmbeddedRedis(Path(tmp) / "redis")
            url = embedded.start()
        try:
            runs: dict[str, dict[str, list[dict]]] = {}
            for q in (int(n) for n in args.queues.split(",")):
                runs[str(q)] = {name: [] for name in TRANSPORTS}
                for _ in range(args.rounds):
                    for name, transport in TRANSPORTS.items():
                        runs[str(q)][name].append(drain(url, transport, q, args.messages))
                print(f"   {q} queue(s): " + ", ".join(
                    f"{name} {statistics.median(r['cpu_us_per_msg'] for r in rs):.0f} us"
                    for name, rs in runs[str(q)].items()), flush=True)  # fmt: skip
        finally:
            if embedded is not None:
                embedded.stop()
    lines = ["| queues consumed | mesh CPU us/msg | kombu CPU us/msg | mesh / kombu | runs (mesh) | runs (kombu) |",
             "|---:|---:|---:|---:|---|---|"]
    for q, by in runs.items():
        m = [r["cpu_us_per_msg"] for r in by["mesh"]]
        k = [r["cpu_us_per_msg"] for r in by["kombu"]]
        lines.append(f"| {q} | {statistics.median(m):.0f} | {statistics.median(k):.0f} | "
                     f"{statistics.median(m) / statistics.median(k):.2f} | "
                     f"{', '.join(f'{x:.0f}' for x in m)} | {', '.join(f'{x:.0f}' for x in k)} |")  # fmt: skip
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "intake.json"
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "python": platform.python_version()},
                               "args": vars(args), "runs": runs}, indent=2))  # fmt: skip
    print(f"\nraw figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
