"""Hostile messages for the soak: what any producer with write access to the mesh's Redis can
push onto a queue, bypassing MeshClient (issue 21's classes).

Each `Hostile` is raw bytes for one Redis list, and says whether the mesh owes an answer: a
message whose task id is readable must be answered (a typed error in its result record); one
without a usable id can only be dropped. The soak checks both: no worker dies, and every owed
answer arrives.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from dataclasses import dataclass

from mesh.protocol.keys import Keys

DEEP = 100_000  # nesting depth of the deep-JSON messages (~200 KB)


@dataclass(frozen=True)
class Hostile:
    kind: str
    list_key: str  # the Redis list it is pushed onto
    bell_key: str  # the bell rung after the push
    raw: bytes
    answer_id: str | None  # the task id whose answer is owed, None if it can only be dropped


def headers(task: str = "mesh.infer", task_id: str | None = None, origin: str = "hostile") -> dict:
    """Celery protocol-2 headers of a task (a fresh id unless `task_id`)."""
    tid = task_id or str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": tid, "root_id": tid, "parent_id": None, "group": None,
            "retries": 0, "argsrepr": "()", "kwargsrepr": "{}", "origin": origin, "ignore_result": False}  # fmt: skip


def envelope(body: bytes, headers: dict, routing_key: object, content_type: str = "application/json",
             *, tag: object = None, **props: object) -> bytes:  # fmt: skip
    """kombu's Redis envelope around `body`, as a producer bypassing MeshClient would push it
    (also the fault tests': tests/faults/test_bad_messages.py); `props` override properties.
    json.dumps escapes a lone surrogate as \\ud800: the bytes stay valid UTF-8 and JSON."""
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": headers.get("id", "x"),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag if tag is not None else str(uuid.uuid4()),
            **props,
        },
    }).encode()


def body(kwargs: object) -> bytes:
    return json.dumps([[], kwargs, {}]).encode()


def catalogue(keys: Keys, model_id: str, good_inputs: list) -> list[tuple[str, object]]:
    """(kind, builder) pairs; a builder takes an rng and returns a Hostile."""
    queue = keys.model_queue(model_id)
    control = keys.control_queue

    def on(q: str, kind: str, raw: bytes, answer_id: str | None) -> Hostile:
        return Hostile(kind, keys.queue_list_key(q, 0), keys.queue_bell(q), raw, answer_id)

    def owed(kind: str, make, q: str = queue):
        def build(rng: random.Random) -> Hostile:
            h = headers()
            return on(q, kind, make(h, rng), h["id"])
        return kind, build

    def dropped(kind: str, make, q: str = queue):
        return kind, lambda rng: on(q, kind, make(rng), None)

    good = {"inputs": good_inputs}
    return [
        dropped("random bytes", lambda rng: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))),
        dropped("JSON, not an envelope", lambda rng: json.dumps([1, {"a": None}]).encode()),
        dropped("deep nesting (raw item)", lambda rng: b"[" * DEEP + b"]" * DEEP),
        dropped("task id a lone surrogate",
                lambda rng: envelope(body(good), headers(task_id="poison\ud800"), queue)),
        owed("delivery tag a lone surrogate", lambda h, rng: envelope(body(good), h, queue, tag="X\ud800")),
        owed("routing key an integer", lambda h, rng: envelope(body(good), h, 12345)),
        owed("deep nesting (task body)", lambda h, rng: envelope(b"[" * DEEP + b"]" * DEEP, h, queue)),
        owed("inputs not a list", lambda h, rng: envelope(body({"inputs": "x"}), h, queue)),
        owed("pickle content type",
             lambda h, rng: envelope(b"\x80\x04N.", h, queue, content_type="application/x-python-serialize")),
        owed("unknown task", lambda h, rng: envelope(body(good), {**h, "task": "no.such.task"}, queue)),
        owed("infer on the control queue", lambda h, rng: envelope(body(good), h, control), q=control),
    ]


__all__ = ["Hostile", "body", "catalogue", "envelope", "headers"]
