"""Raw garbage pushed onto a model queue: each message is rejected with a logged reason, a
request that can be identified gets a clear error, and the worker keeps serving (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import redis
from celery.exceptions import NotRegistered
from celery.result import AsyncResult

from bench.hostile import body, envelope, headers
from mesh.errors import InvalidArgument, InvalidInput, RequestTooLarge
from mesh.models import BatchingConfig, ModelInfo
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info


class Exploit:
    """Unpickling this runs os.mkdir(path): proof that nothing unpickles what it receives."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_garbage_on_a_model_queue_never_kills_the_worker(client, workers, redis_url, svm_path, seed_input, tmp_path):
    w = workers("w1", MESH_MAX_REQUEST_BYTES=4 * 1024 * 1024)
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True, timeout=60)
    queue = client.keys.model_queue("digits")
    list_key = client.keys.queue_list_keys(queue, [0])[0]
    good = {"inputs": [seed_tensor(seed_input)]}
    wrong_types, unknown, huge = headers(), headers(task="no.such.task"), headers()
    pickled, undecodable = headers(), headers()
    marker = tmp_path / "unpickled"  # made only if some process unpickled the payload
    garbage = [
        b"this is not json",
        b"[1, 2, 3]",
        json.dumps({"no": "envelope"}).encode(),
        envelope(body(good), {}, queue),  # no headers at all
        envelope(body(good), {"task": "mesh.infer"}, queue),  # no id
        envelope(b"\x80\x04pickle", headers(), queue, content_type="application/x-python-serialize"),
        envelope(pickle.dumps(Exploit(marker)), pickled, queue, content_type="application/x-python-serialize"),
        envelope(body(good), unknown, queue),
        envelope(body({"inputs": "not a list"}), wrong_types, queue),
        envelope(b"{not json", undecodable, queue),
        envelope(b'[[], {"inputs": [' + b"1," * (25 * 1024 * 1024) + b"1]}, {}]", huge, queue),  # 50 MB
    ]
    r = redis.Redis.from_url(redis_url)
    try:
        for g in garbage:
            r.lpush(list_key, g)
    finally:
        r.close()
    with pytest.raises(InvalidInput):
        AsyncResult(wrong_types["id"], app=client.app).get(timeout=60)
    with pytest.raises(NotRegistered):
        AsyncResult(unknown["id"], app=client.app).get(timeout=60)
    with pytest.raises(RequestTooLarge):
        AsyncResult(huge["id"], app=client.app).get(timeout=60)
    # refused before decoding, with the reason, rather than dropped with the producer waiting
    with pytest.raises(InvalidArgument, match="untrusted content"):
        AsyncResult(pickled["id"], app=client.app).get(timeout=60)
    with pytest.raises(InvalidArgument, match="refused"):
        AsyncResult(undecodable["id"], app=client.app).get(timeout=60)
    assert not marker.exists()
    # the worker still answers, and was never restarted
    for _ in range(3):
        assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert w.alive()
    log = w.tail(400)
    assert "dropped a malformed message" in log and "refusing a" in log and "refusing mesh.infer" in log
    assert "Unrecoverable error" not in log and "consumer: Connection to broker lost" not in log


def test_wrong_shapes_and_dtypes_fail_alone_and_batch_mates_succeed(client, workers, svm_path, onnx_path, seed_input):
    workers("w1")
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=16, max_batch_delay_ms=50))
    client.register_model("digits_onnx", ModelInfo(
        runtime="onnx", uri=f"file://{onnx_path}",
        batching=BatchingConfig(max_batch_size=16, max_batch_delay_ms=50),
    ))  # fmt: skip
    good = [seed_tensor(seed_input)]
    row = {"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}
    bad = {
        "short row": [{**row, "shape": [1, 63], "data": seed_input[:63]}],
        "rank 3": [{**row, "shape": [1, 1, 64]}],
        "two inputs": [row, {**row, "name": "other"}],
        "strings": [{**row, "datatype": "BYTES", "data": ["x"] * 64}],  # typed signature: ONNX
    }
    for model_id in ("digits", "digits_onnx"):
        client.ensure_loaded(model_id, sync=True, timeout=60)
        # sent together so that they share batches with good requests
        sent = [(None, client.infer(model_id=model_id, inputs=good)) for _ in range(4)]
        sent += [
            (why, client.infer(model_id=model_id, inputs=inputs))
            for why, inputs in bad.items()
            if why != "strings" or model_id == "digits_onnx"
        ]
        sent += [(None, client.infer(model_id=model_id, inputs=good)) for _ in range(4)]
        for why, r in sent:
            if why is None:
                assert answer(r.get(timeout=60)) == 8
            else:
                with pytest.raises(InvalidInput):
                    r.get(timeout=60)


# ----------------------------------------------------------------------------- hostile envelopes
# Issue 21: one message on any queue a worker reads could stop it ("Unrecoverable error"). Each
# class is pushed raw onto the three kinds of queue a worker consumes: a model queue (mesh.infer),
# the control queue (mesh.rebalance) and the worker's own command queue (mesh.command).


def push_raw(redis_url: str, keys, queue: str, items: list[bytes]) -> None:
    """LPUSH raw list items onto `queue` and ring its bell, as a producer's publish does."""
    r = redis.Redis.from_url(redis_url)
    try:
        with r.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.queue_list_key(queue, 0), *items)
            pipe.lpush(keys.queue_bell(queue), 1)
            pipe.ltrim(keys.queue_bell(queue), 0, 0)
            pipe.pexpire(keys.queue_bell(queue), 30_000)
            pipe.execute()
    finally:
        r.close()


def raw_envelope(body: bytes, headers: dict, queue: str, *, tag: object = None, routing_key: object = None,
                 **props: object) -> bytes:
    """An envelope whose properties a test may spoil (routing key included)."""
    return envelope(body, headers, queue if routing_key is None else routing_key, tag=tag, **props)


NESTED = b"[" * 100_000 + b"]" * 100_000  # ~200 KB of nested brackets


def hostile_items(case: str, queue: str, task: str, kwargs: dict) -> list[bytes]:
    if case == "nested brackets":
        return [NESTED, json.dumps({"body": "", "properties": {"delivery_tag": "t"}, "x": [NESTED.decode()]}).encode()]
    if case == "surrogate delivery tag":
        return [raw_envelope(body(kwargs), headers(task), queue, tag="X\ud800")]
    if case == "integer routing key":
        return [raw_envelope(body(kwargs), headers(task), queue, routing_key=12345)]
    raise AssertionError(case)


def wait_drained(r, keys, queues: list[str], timeout: float = 60) -> None:
    """Until every queue's lists are empty and nothing is left unacked."""
    from mesh.tools.launcher import wait_for

    unacked = keys.kombu_prefix + "unacked"
    lists = [k for q in queues for k in keys.queue_list_keys(q, [0, 5])]
    wait_for(lambda: sum(r.llen(k) for k in lists) == 0 and r.hlen(unacked) == 0, timeout,
             what="the hostile messages to be taken and settled")  # fmt: skip


@pytest.mark.parametrize("case", ["nested brackets", "surrogate delivery tag", "integer routing key"])
def test_a_hostile_envelope_on_any_queue_never_kills_the_worker(case, client, workers, redis_url, svm_path,
                                                                 seed_input):  # fmt: skip
    w = workers("w1")
    pid = w.pid
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True, timeout=60)
    keys = client.keys
    good = {"inputs": [seed_tensor(seed_input)]}
    model_q, control_q, worker_q = keys.model_queue("digits"), keys.control_queue, keys.worker_queue(w.full_name)
    push_raw(redis_url, keys, model_q, hostile_items(case, model_q, "mesh.infer", good))
    push_raw(redis_url, keys, control_q, hostile_items(case, control_q, "mesh.rebalance", {}))
    push_raw(redis_url, keys, worker_q, hostile_items(case, worker_q, "mesh.command",
                                                      {"op": "wake", "model_id": "digits"}))
    r = redis.Redis.from_url(redis_url)
    try:
        wait_drained(r, keys, [model_q, control_q, worker_q])
    finally:
        r.close()
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert w.alive() and w.pid == pid
    log = w.tail(400)
    assert "Unrecoverable error" not in log and "Traceback" not in log


def test_a_poison_task_id_fails_alone_and_its_batch_mates_are_answered(client, workers, redis_url, svm_path,
                                                                       seed_input):  # fmt: skip
    """A lone surrogate in headers.id cannot be encoded into a Redis key: before, the batch's
    results were stored in one pipeline that failed as a whole, and its 5 good batch-mates
    waited a visibility timeout (300 s)."""
    w = workers("w1", MESH_VISIBILITY_TIMEOUT_S=300)
    client.register_model("digits", sklearn_info(svm_path, max_batch_size=16, max_batch_delay_ms=200))
    client.ensure_loaded("digits", sync=True, timeout=60)
    queue = client.keys.model_queue("digits")
    good = body({"inputs": [seed_tensor(seed_input)]})
    poison = headers()
    poison["id"] = poison["root_id"] = "X\ud800"
    mates = [headers() for _ in range(5)]
    items = [raw_envelope(good, h, queue) for h in mates[:2]]
    items += [raw_envelope(good, poison, queue)] + [raw_envelope(good, h, queue) for h in mates[2:]]
    push_raw(redis_url, client.keys, queue, items)  # one push: taken together, one batch
    for h in mates:  # well within the visibility timeout
        assert answer(AsyncResult(h["id"], app=client.app).get(timeout=60)) == 8
    r = redis.Redis.from_url(redis_url)
    try:
        wait_drained(r, client.keys, [queue])  # the poison is not left unacked either
    finally:
        r.close()
    assert w.alive()


@pytest.mark.parametrize("model_header", ["absent", "not a str", "not a valid id", "not served here"])
def test_an_infer_on_a_queue_that_is_not_a_model_queue_is_answered_invalid_argument(
    model_header, client, workers, redis_url, svm_path, seed_input
):
    """Before, it was requeued to the same queue in a loop (~425 times a second) until a restart."""
    w = workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True, timeout=60)
    good = {"inputs": [seed_tensor(seed_input)]}
    sent = []
    for queue in (client.keys.worker_queue(w.full_name), client.keys.control_queue):
        h = headers()
        if model_header != "absent":
            h["mm-model-id"] = {"not a str": 42, "not a valid id": "bad\x00id", "not served here": "other"}[model_header]
        push_raw(redis_url, client.keys, queue, [raw_envelope(body(good), h, queue)])
        sent.append((queue, h["id"]))
    for _queue, task_id in sent:
        with pytest.raises(InvalidArgument, match="not a model queue"):
            AsyncResult(task_id, app=client.app).get(timeout=60)
    r = redis.Redis.from_url(redis_url)
    try:
        wait_drained(r, client.keys, [q for q, _ in sent])
    finally:
        r.close()
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert w.alive()


def test_a_model_whose_binding_tables_a_producer_squatted_is_still_served(client, workers, redis_url, svm_path,
                                                                         seed_input):  # fmt: skip
    """Any producer may write the binding tables of model queues (a plain `send_task`
    declares them). A string in their place failed the worker's declare when it started
    consuming the model's queue: the model was announced LOADED and its requests waited forever."""
    w = workers("w1")
    client.register_model("digits", sklearn_info(svm_path))
    r = redis.Redis.from_url(redis_url)
    try:
        for table in client.keys.queue_bindings(client.keys.model_queue("digits")):
            r.set(table, "not a set")
        assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=30)) == 8
        assert {r.type(t) for t in client.keys.queue_bindings(client.keys.model_queue("digits"))} <= {b"set", b"none"}
    finally:
        r.close()
    assert w.alive()
    assert "deleted the binding table" in w.tail(200)
