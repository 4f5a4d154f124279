"""Where a request's CPU goes: py-spy samples sorted into the parts of the request path.

    py-spy record -p PID -d 8 -r 300 -f raw --gil --nonblocking -o samples.txt
    python -m bench.cpu_parts producer|worker samples.txt [CPU_MS_PER_REQUEST]

With `--gil`, py-spy keeps only samples of the thread holding the interpreter lock: Python's
CPU, what one process can spend. Each sample goes to the first part whose frame names it
contains (the rules below, in order); times are a part's share of the samples times the CPU
per request the benchmark measured (`scripts/bench closedloop`'s producer and worker columns).
docs/benchmarks.md, "Where one request's CPU goes", was made this way.
"""

from __future__ import annotations

import sys
from collections import Counter

RULES: dict[str, list[tuple[str, list[str]]]] = {
    "producer": [
        ("size check", ["payload_nbytes"]),
        ("encode inputs", ["encode_inputs", "_many_items"]),
        ("Flower's argument repr", ["saferepr", "reprstream", "kwargs_repr"]),
        ("routing", ["Router.route", "Router.prepare", "route_task"]),
        ("message build", ["infer_message", "InferPublisher.prepare", "as_task_v2", "AMQP.as_task",
                           "Producer.publish", "_prepare_message"]),  # fmt: skip
        ("publish (Redis call)", ["InferPublisher.push", "Channel._put", "basic_publish", "Producer._publish"]),
        ("result wait", ["MeshResult.get", "ReplyListener", "AsyncResult.get", "wait_for_pending",
                         "ResultConsumer", "drain_events"]),  # fmt: skip
        ("send (Celery/kombu other)", ["send_task", "MeshClient._send", "MeshClient._prepare"]),
    ],
    "worker": [
        ("store + ack (results pipeline)", ["InferenceLoop._store", "forget_acked", "ack_many"]),
        ("predict", ["Runtime.predict", "SklearnRuntime.predict", "._predict"]),
        ("decode + check", ["InferenceLoop._decode", "_stacked_units", "decode_inputs"]),
        ("events", ["_flush_events", "EventDispatcher", "send_event", "_complete_all", "_accept_all"]),
        ("result encode", ["_result_meta", "InferenceLoop._finish"]),
        ("intake: pop + Celery Request + buffer", ["_brpop_read", "_brpop_start", "_pop_now", "on_poll_start",
                                                   "Channel._take", "on_readable"]),  # fmt: skip
        ("heartbeat, metrics, other threads", ["Heartbeat", "serve_forever"]),
        ("event loop, thread hand-offs", ["Hub.create_loop", "asynloop", "Condition.wait", "call_soon", "_epoll",
                                          "Batcher.take", "ModelManager.acquire", "InferenceLoop.process",
                                          "_WorkItem", "_worker"]),  # fmt: skip
    ],
}


def parts(side: str, lines: list[str]) -> tuple[Counter, int]:
    """(samples per part, total samples) of py-spy raw output lines ("frame;frame;... count")."""
    counts: Counter = Counter()
    total = 0
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        part = next((name for name, keys in RULES[side] if any(k in stack for k in keys)), "unattributed")
        counts[part] += int(n)
    return counts, total


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in RULES:
        print(__doc__)
        return 2
    side, path = args[0], args[1]
    per_request_ms = float(args[2]) if len(args) > 2 else None
    with open(path) as f:
        counts, total = parts(side, f.readlines())
    for name in [n for n, _ in RULES[side]] + ["unattributed"]:
        share = counts[name] / total if total else 0.0
        extra = f"  {share * per_request_ms * 1000:.0f} us/req" if per_request_ms is not None else ""
        print(f"{name:<40} {share:6.1%}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
