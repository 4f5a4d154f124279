"""Fuzzing (hypothesis): tensor decoding, id validation, the management calls and the worker's
intake never crash and only raise the project's typed errors (MeshError subclasses). Random
ids never create a Redis key outside the mesh's prefix, nor a key or queue name holding
anything but the encoding of a valid id.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import MeshClient
from mesh.errors import InvalidId, InvalidInput, MeshError
from mesh.protocol.ids import MAX_ID_BYTES, SAFE_CHARS, decode_id, encode_id, is_valid_id, validate_id
from mesh.protocol.keys import KOMBU_PRIORITY_SEP, Keys
from mesh.protocol.messages import INFER_TASK
from mesh.protocol.tensors import DATATYPES, decode_inputs, encode_inputs
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import wait_for
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info

FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.integers(min_value=-(2**80), max_value=2**80)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=25,
)
valid_ids = st.from_regex(f"[{SAFE_CHARS}]{{1,{MAX_ID_BYTES}}}", fullmatch=True) | st.text(min_size=1, max_size=40)
tricky_ids = st.sampled_from([
    "", " ", "a b", "a*", "a?", "[a]", "a\n", "a\r\nSET x 1", "a\x00", "../x", "a/b", "x\\y", "é",
    f"a{KOMBU_PRIORITY_SEP}5", "x:models", "*", "a" * 512, "a" * 513, "é" * 257, "mesh.model.x", "{x}",
    "a%2Fb", "%", "%2", "modèle", "模型", "🤖", "\ud800",
])  # fmt: skip
pool_ids = st.sampled_from(["m1", "m2", "v1", "ns:m@3"])  # so that calls meet the same ids
ids = st.one_of(pool_ids, valid_ids, tricky_ids, st.text(max_size=40), json_scalars)
tensor_dicts = st.fixed_dictionaries(
    {
        "name": st.text(max_size=6) | json_scalars,
        "shape": st.lists(st.integers(min_value=-1, max_value=5), max_size=4) | json_values,
        "datatype": st.sampled_from(DATATYPES) | json_scalars,
        "data": st.lists(json_scalars, max_size=12) | json_values,
    },
    optional={"extra": json_values},
)
arrays = st.sampled_from(
    ["f4", "f8", "i8", "u1", "b1", "U3", "c8", "M8[s]", "O", "S3", "f2"]
).flatmap(lambda dt: st.lists(st.integers(0, 3), min_size=0, max_size=3).map(
    lambda shape: np.zeros(shape, dtype=dt)))  # fmt: skip
client_inputs = st.one_of(
    st.lists(tensor_dicts, max_size=3),
    arrays,
    st.lists(arrays, max_size=3),
    st.dictionaries(st.text(max_size=4) | st.integers(), arrays | json_values, max_size=3),
    json_values,
)
infos = st.one_of(
    st.fixed_dictionaries(
        {"runtime": st.sampled_from(["sklearn", "onnx", "python", "nope"]) | st.text(max_size=6),
         "uri": st.sampled_from(["file:///m/a.joblib", "s3://b/k", "file:///m/../etc", "x"]) | st.text(max_size=12)},
        optional={"batching": json_values | st.fixed_dictionaries({"max_batch_size": json_scalars}),
                  "storage_key": ids, "python_class": st.text(max_size=10), "size_bytes": json_scalars,
                  "min_copies": json_scalars, "max_copies": json_scalars, "bogus": json_values},
    ),
    json_values,
)  # fmt: skip


# ----------------------------------------------------------------------------- pure functions


@settings(max_examples=500, deadline=None)
@given(ids)
def test_validate_id_accepts_exactly_the_rule_and_keys_hold_only_the_encoding(value):
    try:
        out = validate_id(value)
    except InvalidId:
        assert not is_valid_id(value)
        return
    assert out == value and isinstance(value, str) and "\x00" not in value
    assert 1 <= len(value.encode("utf-8")) <= MAX_ID_BYTES
    # a valid id never splits a key or a queue name, and reads back from one unchanged
    keys = Keys("p")
    for name in (keys.copies(value), keys.failures(value), keys.load_claim(value), keys.model_queue(value)):
        assert re.fullmatch(r"[A-Za-z0-9_.:@%-]+", name)
    assert keys.model_from_queue(keys.model_queue(value)) == value
    assert decode_id(encode_id(value)) == value


@settings(max_examples=400, deadline=None)
@given(st.lists(tensor_dicts, max_size=4) | json_values)
def test_decode_inputs_only_raises_invalid_input(raw):
    try:
        out = decode_inputs(raw)
    except InvalidInput:
        return
    assert isinstance(out, dict) and out and all(isinstance(a, np.ndarray) for a in out.values())


@settings(max_examples=400, deadline=None)
@given(client_inputs)
def test_encode_inputs_only_raises_invalid_input_and_its_output_decodes(inputs):
    try:
        tensors = encode_inputs(inputs)
    except InvalidInput:
        return
    assert set(decode_inputs(tensors)) == {t["name"] for t in tensors}


# ----------------------------------------------------------------------------- the API


@pytest.fixture
def private_client(tmp_path: Path, prefix: str) -> Iterator[MeshClient]:
    """A client on a Redis of its own, so every key in it can be attributed to this test."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = MeshClient(redis_url=server.url, prefix=prefix)
        try:
            yield client
        finally:
            client.close()


GOOD = [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]
ops = st.one_of(
    st.tuples(st.just("register"), ids, infos),
    st.tuples(st.just("register_valid"), pool_ids | valid_ids),
    st.tuples(st.just("unregister"), ids),
    st.tuples(st.just("delete_vmodel"), pool_ids),
    st.tuples(st.just("status"), ids),
    st.tuples(st.just("ensure_loaded"), ids),
    st.tuples(st.just("config"), ids),
    st.tuples(st.just("set_vmodel"), ids, ids, infos | st.none()),
    st.tuples(st.just("set_vmodel"), pool_ids, pool_ids, st.none()),
    st.tuples(st.just("vstatus"), ids),
    st.tuples(st.just("delete_vmodel"), ids),
    st.tuples(st.just("infer"), ids, client_inputs),
    st.tuples(st.just("infer_vmodel"), ids, client_inputs),
    st.tuples(st.just("infer_vmodel"), pool_ids, st.just(GOOD)),
    st.tuples(st.just("infer_options"), st.sampled_from(["high", "normal", "urgent", ""]) | json_scalars,
              json_scalars),
)  # fmt: skip


def run_op(client: MeshClient, op: tuple) -> None:
    kind, *args = op
    if kind == "register":
        client.register_model(args[0], args[1])
    elif kind == "register_valid":
        client.register_model(args[0], {"runtime": "sklearn", "uri": "file:///m/model.joblib"})
    elif kind == "unregister":
        client.unregister_model(args[0])
    elif kind == "status":
        client.get_model_status(args[0])
    elif kind == "ensure_loaded":
        client.ensure_loaded(args[0])
    elif kind == "config":
        client.get_effective_config(args[0])
    elif kind == "set_vmodel":
        client.set_vmodel(args[0], args[1], model_info=args[2])
    elif kind == "vstatus":
        client.get_vmodel_status(args[0])
    elif kind == "delete_vmodel":
        client.delete_vmodel(args[0])
    elif kind == "infer":
        client.infer(model_id=args[0], inputs=args[1]).forget()
    elif kind == "infer_vmodel":
        client.infer(vmodel_id=args[0], inputs=args[1]).forget()
    elif kind == "infer_options":
        client.register_model("known", {"runtime": "sklearn", "uri": "file:///m/model.joblib"})
        client.infer(model_id="known", inputs=GOOD, priority=args[0], timeout_ms=args[1]).forget()


def test_management_calls_only_raise_typed_errors_and_keys_stay_under_the_prefix(private_client, prefix):
    client = private_client

    @settings(max_examples=300, deadline=None, suppress_health_check=FIXTURES_OK)
    @given(st.lists(ops, min_size=1, max_size=6))
    def check(program):
        for op in program:
            try:
                run_op(client, op)
            except MeshError:
                pass  # typed, with a ModelMesh code: what a caller can handle

    check()
    # every key the fuzzed calls created lies under the prefix, and every id in a key or queue
    # name is a valid id (nothing a random id could inject)
    keys = Keys(prefix)
    per_id = re.compile(rf"^{re.escape(prefix)}:(copies|failures|loadclaim|vmlock|vmdirty):(?P<id>.*)$")
    queue = re.compile(
        rf"^{re.escape(keys.kombu_prefix)}(_kombu\.binding\.)?{re.escape(prefix)}\.model\.(?P<id>[^\x06]*)"
        rf"({KOMBU_PRIORITY_SEP}\d+)?$"
    )
    seen = [k.decode("utf-8", "replace") for k in client.store.r.scan_iter(count=1000)]
    assert seen, "the fuzz created nothing: it did not reach Redis"
    for key in seen:
        assert key.startswith(f"{prefix}:"), f"key outside the prefix: {key!r}"
        m = per_id.match(key) or queue.match(key)
        if m:
            assert decode_id(m.group("id")) is not None, f"an invalid id reached a key: {key!r}"


# ----------------------------------------------------------------------------- the worker


worker_kwargs = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(tensor_dicts, max_size=3) | json_values}),
    st.fixed_dictionaries({"items": st.lists(st.lists(tensor_dicts, max_size=2) | json_values, max_size=3)
                           | json_values}),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)  # fmt: skip


def test_worker_answers_random_requests_with_typed_errors_and_keeps_serving(client, workers, svm_path, seed_input):
    """What any Celery producer can put in a mesh.infer message (bypassing the client's checks)."""
    w = workers("w1")
    client.register_model("digits", sklearn_info(svm_path, max_batch_delay_ms=1))
    client.ensure_loaded("digits", sync=True, timeout=60)
    queue = client.keys.model_queue("digits")

    @settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
    @given(worker_kwargs)
    def check(kwargs):
        r = client.app.send_task(INFER_TASK, kwargs=kwargs, queue=queue, headers={"mm-model-id": "digits"})
        try:
            r.get(timeout=60)
        except MeshError:
            pass
        # anything else (a timeout above all) fails the test

    check()
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert w.alive()
    assert "Traceback" not in w.tail(5000)


# ----------------------------------------------------------------------------- the whole envelope
# Issue 21: not only a task's arguments but everything a producer controls in a list item: the
# raw bytes, the envelope's fields and their types, the body and its encodings, the headers,
# the properties, the nesting depth and the sizes, pushed raw onto the queues a worker reads.

SURROGATE = "X\ud800"
odd_text = st.sampled_from(["", SURROGATE, "a" * 300, "\x00", "é", "a b"]) | st.text(max_size=12)
odd_values = st.one_of(json_scalars, odd_text, json_values, st.just("x" * 300_000))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


task_bodies = st.one_of(
    st.builds(lambda kw: b64(json.dumps([[], kw, {}]).encode()), worker_kwargs),
    st.builds(lambda v: b64(json.dumps(v).encode()), json_values),  # JSON of the wrong shape
    st.builds(lambda kw: json.dumps([[], kw, {}]), worker_kwargs),  # not base64 while said to be
    st.builds(b64, st.binary(max_size=64)),  # base64 of garbage
    st.integers(1, 150_000).map(lambda d: b64(nested(d).encode())),  # nested too deep to decode
    odd_values,
)


@st.composite
def envelopes(draw, queue: str) -> tuple[bytes, str | None]:
    """A raw list item and, for a mesh.infer with a usable id, that id (it is owed an answer)."""
    shape = draw(st.sampled_from(["envelope"] * 9 + ["raw", "nested", "json"]))
    if shape == "raw":
        return draw(st.binary(max_size=256)), None
    if shape == "nested":
        return nested(draw(st.integers(1, 150_000))).encode(), None
    if shape == "json":
        return json.dumps(draw(json_values)).encode(), None
    # mostly well-formed, each field spoiled now and then (hypothesis draws each branch of a
    # one_of alike: weights are repetitions in sampled_from)
    often = st.sampled_from([True] * 5 + [False])
    task = draw(st.sampled_from(["mesh.infer"] * 5 + ["mesh.command", "mesh.rebalance", "no.such.task", "odd"]))
    task = draw(odd_values) if task == "odd" else task
    good_id = draw(often)
    task_id = str(uuid.uuid4()) if good_id else draw(odd_values)
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
               "retries": 0, "argsrepr": "()", "kwargsrepr": "{}", "origin": "fuzz", "ignore_result": False}
    headers.update(draw(st.dictionaries(
        st.sampled_from(["mm-model-id", "mm-vmodel-id", "expires", "eta", "retries", "timelimit", "shadow",
                         "argsrepr", "root_id", "parent_id", "lang", "ignore_result", "stamps"]),
        st.sampled_from(["digits", "nope", "2020-01-01T00:00:00", "2999-01-01T00:00:00+00:00"]) | odd_values,
        max_size=draw(st.sampled_from([0, 0, 1, 3])))))  # fmt: skip
    headers.pop(draw(st.sampled_from([""] * 8 + ["id", "task", "lang"])), None)
    props = {
        "correlation_id": task_id,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    props.update(draw(st.dictionaries(
        st.sampled_from(["delivery_tag", "delivery_info", "priority", "body_encoding", "reply_to",
                         "correlation_id", "delivery_mode"]),
        st.sampled_from([None, "", SURROGATE, 12345, 2**70, -1, "base64", "rot13", "t" * 5000,
                         {"exchange": "", "routing_key": 7}, {"exchange": [], "routing_key": queue},
                         {"routing_key": queue}]) | odd_values,
        max_size=draw(st.sampled_from([0, 0, 0, 1, 2])))))  # fmt: skip
    item: dict = {
        "body": draw(st.sampled_from(["good"] * 3 + ["odd"])),
        "content-encoding": draw(st.sampled_from(["utf-8", "binary", "latin-1", None]) | odd_values),
        "content-type": draw(st.sampled_from(["application/json", "application/x-python-serialize",
                                              "text/plain", None]) | odd_values),  # fmt: skip
        "headers": headers if draw(often) else draw(odd_values),
        "properties": props if draw(often) else draw(odd_values),
    }
    if item["body"] == "good":
        item["body"] = b64(json.dumps([[], draw(worker_kwargs), {}]).encode())
    else:
        item["body"] = draw(task_bodies)
    item.pop(draw(st.sampled_from([""] * 12 + list(item))), None)
    sent = item.get("headers")
    owed = task_id if good_id and isinstance(sent, dict) and sent.get("task") == "mesh.infer" \
        and sent.get("id") == task_id else None  # fmt: skip
    return json.dumps(item).encode(), owed


def test_whole_envelopes_pushed_raw_never_kill_the_worker_and_every_owed_answer_comes(
    client, workers, redis_url, svm_path, seed_input
):
    w = workers("w1")
    pid = w.pid
    client.register_model("digits", sklearn_info(svm_path, max_batch_delay_ms=1))
    client.ensure_loaded("digits", sync=True, timeout=60)
    keys = client.keys
    queues = [keys.model_queue("digits"), keys.control_queue, keys.worker_queue(w.full_name)]
    r = redis.Redis.from_url(redis_url)
    owed_total: list[str] = []
    missing: list[tuple[str, bytes]] = []  # owed an answer that did not come: (id, the item's first bytes)
    backend = client.app.backend

    @settings(max_examples=int(os.environ.get("MESH_FUZZ_ENVELOPES", "40")), deadline=None,
              suppress_health_check=FIXTURES_OK)  # fmt: skip
    @given(st.lists(st.tuples(st.sampled_from(queues), st.data()), min_size=1, max_size=6))
    def check(picks):
        pushed: dict[str, list[bytes]] = {}
        owed: dict[str, bytes] = {}
        for queue, data in picks:
            item, task_id = data.draw(envelopes(queue))
            pushed.setdefault(queue, []).append(item)
            if task_id is not None:
                owed[task_id] = item
        with r.pipeline(transaction=False) as pipe:  # one round trip per example
            for queue, items in pushed.items():
                pipe.lpush(keys.queue_list_key(queue, 0), *items)
                pipe.lpush(keys.queue_bell(queue), 1)
                pipe.ltrim(keys.queue_bell(queue), 0, 0)
            pipe.execute()
        # each owed an answer (a result, a typed error, or revoked): its record appears in the
        # result store; the examples go on meanwhile, the missing ones are reported at the end
        result_keys = {backend.get_key_for_task(t): t for t in owed}
        try:
            wait_for(lambda: not w.alive() or all(r.mget(list(result_keys))), 20, what="owed answers")
        except TimeoutError:
            missing.extend((t, owed[t][:300]) for k, t in result_keys.items() if not r.exists(k))
        owed_total.extend(owed)
        assert w.alive() and w.pid == pid

    try:
        check()
        # nothing left in a queue or unacked: each message was answered, refused or dropped
        lists = [k for q in queues for k in keys.queue_list_keys(q, [0, 5])]
        unacked = keys.kombu_prefix + "unacked"
        wait_for(lambda: sum(r.llen(k) for k in lists) == 0 and r.hlen(unacked) == 0, 60,
                 what="every fuzzed message to be settled")  # fmt: skip
    finally:
        r.close()
    assert owed_total, "the fuzz owed no answer: it did not reach the infer strategy"
    assert not missing, f"{len(missing)} of {len(owed_total)} owed answers never came: {missing[:3]}"
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert w.alive() and w.pid == pid
    log = w.tail(20000)
    assert "Unrecoverable error" not in log and "Connection to broker lost" not in log
