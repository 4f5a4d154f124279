"""The lean request path end to end, with a real worker: results reach MeshClient through its
reply list and every other reader the Celery way."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import redis
from celery.result import AsyncResult

from mesh import ModelInfo
from mesh.broker.replies import MeshResult
from mesh.protocol.messages import INFER_TASK, MODEL_HEADER, PRIORITIES
from mesh.tools.launcher import REPO_ROOT


def seed_tensor(seed_input: list[float]) -> list[dict]:
    return [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}]


def register(client, svm_path) -> None:
    client.register_model("digits", ModelInfo(runtime="sklearn", uri=f"file://{svm_path}"), load_now=True, sync=True)


def test_a_result_reaches_the_producer_and_any_other_process(client, workers, svm_path, seed_input, redis_url, prefix):
    workers("w1")
    register(client, svm_path)
    handle = client.infer("digits", inputs=seed_tensor(seed_input))
    assert isinstance(handle, MeshResult) and isinstance(handle, AsyncResult)
    response = handle.get(timeout=30)
    assert response["outputs"][0]["data"] == [8]
    assert handle.successful() and handle.state == "SUCCESS"
    # another process, knowing only Celery and the id, reads the same result
    code = (
        "import json, sys\n"
        "from celery.result import AsyncResult\n"
        "from mesh import MeshClient\n"
        f"c = MeshClient(redis_url={redis_url!r}, prefix={prefix!r})\n"
        "print(json.dumps(AsyncResult(sys.argv[1], app=c.app).get(timeout=30)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, handle.id], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT, check=True)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == response


def test_plain_celery_producers_keep_celerys_results(client, workers, svm_path, seed_input, redis_url, prefix):
    workers("w1")
    register(client, svm_path)
    sent = client.app.send_task(INFER_TASK, kwargs={"inputs": seed_tensor(seed_input)},
                                headers={MODEL_HEADER: "digits"})  # fmt: skip
    assert isinstance(sent, AsyncResult) and not isinstance(sent, MeshResult)
    assert sent.get(timeout=30)["outputs"][0]["data"] == [8]
    rds = redis.Redis.from_url(redis_url)
    try:  # no reply list was made for it: its producer did not name one
        assert list(rds.scan_iter(match=f"{client.keys.kombu_prefix}reply.*")) == []
    finally:
        rds.close()


def test_one_event_loop_keeps_a_thousand_requests_in_flight(client, workers, svm_path, seed_input):
    workers("w1")
    register(client, svm_path)
    client.infer("digits", inputs=seed_tensor(seed_input)).get(timeout=30)  # the listener runs
    # and the client's one route thread (a model not remembered as served routes on it)
    client.router.forget("digits")
    asyncio.run(asyncio.wait_for(client.infer_async("digits", inputs=seed_tensor(seed_input)), 30))
    # by identity, not a count: a thread of an earlier test (a closed client's listener, up to
    # its wait) may end meanwhile, which made a count drop from 3 to 2 in one suite run
    before = set(threading.enumerate())

    async def main() -> list[dict]:
        return await asyncio.gather(*(client.infer_async("digits", inputs=seed_tensor(seed_input))
                                      for _ in range(1000)))  # fmt: skip

    responses = asyncio.run(asyncio.wait_for(main(), 120))
    assert [r["outputs"][0]["data"] for r in responses] == [[8]] * 1000
    assert len({r["id"] for r in responses}) == 1000
    assert [t.name for t in threading.enumerate() if t not in before] == []  # no thread per request


def test_infer_many_async_answers_each_item(client, workers, svm_path, seed_input):
    workers("w1")
    register(client, svm_path)
    out = asyncio.run(client.infer_many_async("digits", inputs=[seed_tensor(seed_input)] * 3))
    assert [item["outputs"][0]["data"] for item in out["results"]] == [[8]] * 3


def test_a_queue_list_of_another_type_is_replaced_and_every_send_of_the_turn_answered(
    client, workers, svm_path, seed_input, redis_url
):
    """The sends of one loop turn share one push (mesh/broker/publisher.py `Outbox`). A string
    where a model's queue list goes (any producer may write it) stopped that push: requests sent
    before it in the turn were on their queue and answered, yet their callers got its WRONGTYPE;
    those after it were never sent; and every later request to that model failed until an
    operator deleted the key. The push replaces it now, and every send of the turn is answered."""
    workers("w1")
    register(client, svm_path)
    client.register_model("other", ModelInfo(runtime="sklearn", uri=f"file://{svm_path}"), load_now=True, sync=True)
    good = seed_tensor(seed_input)
    for model_id in ("digits", "other"):  # remembered as served: all three route in one turn
        assert client.infer(model_id, inputs=good).get(timeout=30)["outputs"][0]["data"] == [8]
    rds = redis.Redis.from_url(redis_url)
    squatted = client.keys.queue_list_key(client.keys.model_queue("other"), PRIORITIES["normal"])
    rds.set(squatted, "squatted")
    try:

        async def main() -> list:
            sends = (client.infer_async(m, inputs=good) for m in ("digits", "other", "digits"))
            return await asyncio.gather(*sends, return_exceptions=True)

        outcomes = asyncio.run(asyncio.wait_for(main(), 60))
        assert [o if isinstance(o, BaseException) else o["outputs"][0]["data"] for o in outcomes] == [[8]] * 3
        assert rds.type(squatted) in (b"list", b"none")  # a list again (popped empty: none)
    finally:
        rds.delete(squatted)
        rds.close()
