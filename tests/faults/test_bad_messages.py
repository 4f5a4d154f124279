"""Raw garbage pushed onto a model queue: each message is rejected with a logged reason, a
request that can be identified gets a clear error, and the worker keeps serving (docs/reliability.md)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import uuid

import pytest
import redis
from celery.exceptions import NotRegistered
from celery.result import AsyncResult

from mesh.errors import InvalidArgument, InvalidInput, RequestTooLarge
from mesh.models import BatchingConfig, ModelInfo
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info


def envelope(body: bytes, headers: dict, queue: str, content_type: str = "application/json") -> bytes:
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": headers.get("id", "x"),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }).encode()


def headers(task="mesh.infer"):
    tid = str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": tid, "root_id": tid, "parent_id": None, "group": None,
            "retries": 0, "argsrepr": "()", "kwargsrepr": "{}", "origin": "test", "ignore_result": False}


def body(kwargs) -> bytes:
    return json.dumps([[], kwargs, {}]).encode()


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
