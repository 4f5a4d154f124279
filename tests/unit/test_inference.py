"""The inference thread in the test process: a real InferenceLoop and results thread, the real
model manager and Celery result backend on a real Redis, in-memory consumer port
(tests/unit/fakes.py). No worker process: requests are put straight into the batcher.
"""

from __future__ import annotations

import gc
import json
import threading
import weakref
from datetime import datetime, timedelta, timezone

import pytest
from celery.result import AsyncResult

from mesh.app import create_app
from mesh.tools.launcher import wait_for
from tests.unit.fakes import FakeRequest
from tests.unit.worker_rig import Rig
from workers.batcher import BatchPolicy
from workers.inference import InferenceLoop

PICKY = "tests.integration.pyclasses:Picky"


class Dispatcher:
    """Celery's event dispatcher, as far as the batch event goes."""

    enabled = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, type_: str, **fields) -> None:
        self.sent.append((type_, fields))


class Loop:
    """A started InferenceLoop on the rig's manager, and what a test needs around it."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.app = create_app(rig.settings)
        rig.consumer.dispatcher = self.dispatcher = Dispatcher()
        self.loop = InferenceLoop(
            rig.batcher, rig.manager, rig.consumer, rig.metrics, rig.store.keys,
            backend=lambda: self.app.backend, result_expires_s=60,
        )  # fmt: skip
        self.stored_at_ack: dict[str, bool] = {}

    def request(self, task_id: str, model_id: str = "m", **kwargs) -> FakeRequest:
        req = FakeRequest(task_id, kwargs, routing_key=self.rig.store.keys.model_queue(model_id))
        key = self.app.backend.get_key_for_task(task_id)
        req._message.on_ack = lambda m: self.stored_at_ack.__setitem__(task_id, bool(self.rig.client.exists(key)))
        return req

    def result(self, task_id: str, timeout: float = 10):
        return AsyncResult(task_id, app=self.app).get(timeout=timeout, propagate=False)

    def start(self) -> None:
        self.loop.start()

    def batch_events(self, messages: int) -> list[dict]:
        """The `mesh-batch` events, once they account for `messages` requests: a batch's event
        is sent after its results are stored (results thread, then the consumer's callbacks),
        so a result being readable does not mean its batch's event was sent yet."""
        def sent() -> list[dict]:
            return [f for t, f in list(self.dispatcher.sent) if t == "mesh-batch"]

        wait_for(lambda: sum(b["messages"] for b in sent()) >= messages, 10, what="the batch events")
        return sent()

    def close(self) -> None:
        self.rig.batcher.stop()
        self.loop.stop()
        if self.loop.is_alive():
            self.loop.join(timeout=10)
        self.app.close()


def tensor(*values: float) -> list[dict]:
    return [{"name": "x", "shape": [1, len(values)], "datatype": "FP32", "data": list(values)}]


@pytest.fixture
def rig(redis_url, prefix, tmp_path):
    r = Rig(redis_url, prefix, tmp_path, max_batch_size=8)
    yield r
    r.close()


@pytest.fixture
def loop(rig):
    lp = Loop(rig)
    yield lp
    lp.close()


def test_a_failing_item_is_bisected_out_and_its_batch_mates_succeed(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    values = [1.0, 2.0, -3.0, 4.0, 5.0, 6.0]
    for i, v in enumerate(values):  # all buffered before the loop runs: one batch of six
        rig.batcher.add("m", loop.request(f"r{i}", inputs=tensor(v, v)))
    loop.start()
    for i, v in enumerate(values):
        result = loop.result(f"r{i}")
        if v < 0:
            assert isinstance(result, Exception) and "negative input rejected" in str(result)
        else:
            assert result["model_name"] == "m"
            assert result["outputs"][0]["data"] == [2 * v, 2 * v]
    batches = loop.batch_events(6)
    assert [(b["size"], b["messages"], b["failed"]) for b in batches] == [(6, 6, 1)]


def test_results_are_stored_before_their_messages_are_acked(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    reqs = [loop.request(f"r{i}", inputs=tensor(i, i)) for i in range(4)]
    for req in reqs:
        rig.batcher.add("m", req)
    loop.start()
    for i in range(4):
        loop.result(f"r{i}")
    for req in reqs:  # acked right after the pipeline that stored the results has run
        for _ in range(250):
            if req._message.acknowledged:
                break
            threading.Event().wait(0.02)
    assert loop.stored_at_ack == {f"r{i}": True for i in range(4)}
    assert all(req.acknowledged for req in reqs)
    assert [e[0] for e in reqs[0].events] == ["accepted", "task-succeeded"]


def test_a_malformed_request_fails_alone(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    rig.batcher.add("m", loop.request("bad", nonsense=1))
    rig.batcher.add("m", loop.request("bad-tensor", inputs=[{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                             "data": [1.0]}]))  # fmt: skip
    rig.batcher.add("m", loop.request("good", inputs=tensor(1.0, 1.0)))
    loop.start()
    assert "needs 'inputs'" in str(loop.result("bad"))
    assert isinstance(loop.result("bad-tensor"), Exception)
    assert loop.result("good")["outputs"][0]["data"] == [2.0, 2.0]


def test_a_micro_batch_answers_each_item(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    rig.batcher.add("m", loop.request("many", items=[tensor(1, 1), tensor(-1, -1), tensor(3, 3)]), items=3)
    loop.start()
    result = loop.result("many")
    assert result["results"][0]["outputs"][0]["data"] == [2.0, 2.0]
    assert result["results"][1]["error"]["type"] == "InferenceError"
    assert result["results"][2]["outputs"][0]["data"] == [6.0, 6.0]


def test_a_lone_request_is_stored_by_the_inference_thread_a_micro_batch_by_the_results_thread(
    rig, loop, monkeypatch
):
    """Nothing else buffered: a lone request's results pipeline runs on the inference thread (no
    hand-over: its latency); a micro-batch's goes to the results thread, so that the inference
    thread is free for the next message meanwhile (infer_many throughput)."""
    stored_by: dict[str, str] = {}
    store = InferenceLoop._store

    def spy(self, results, messages, *args, **kwargs):
        for m in messages:
            stored_by[m.pending.req.id] = threading.current_thread().name
        return store(self, results, messages, *args, **kwargs)

    monkeypatch.setattr(InferenceLoop, "_store", spy)
    rig.register("m", python_class=PICKY)
    rig.load("m")
    loop.start()
    rig.batcher.add("m", loop.request("lone", inputs=tensor(1.0, 1.0)))
    assert loop.result("lone")["outputs"][0]["data"] == [2.0, 2.0]
    rig.batcher.add("m", loop.request("many", items=[tensor(1, 1), tensor(2, 2)]), items=2)
    assert [r["outputs"][0]["data"] for r in loop.result("many")["results"]] == [[2.0, 2.0], [4.0, 4.0]]
    assert stored_by["lone"] == "mesh-inference"
    assert stored_by["many"].startswith("mesh-results")


def test_a_micro_batch_of_alike_items_with_a_bad_one_still_fails_it_alone(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    items = [tensor(1, 1), tensor(2, 2), [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0]}],
             tensor(4, 4), tensor(-5, -5)]  # fmt: skip
    rig.batcher.add("m", loop.request("many", items=items), items=len(items))
    alike = [tensor(i, i) for i in range(1, 7)]
    rig.batcher.add("m", loop.request("alike", items=alike), items=len(alike))
    loop.start()
    result = loop.result("many")["results"]
    assert [r.get("outputs", [{}])[0].get("data") for r in result] == [[2.0, 2.0], [4.0, 4.0], None, [8.0, 8.0], None]
    assert result[2]["error"]["type"] == "InvalidInput" and result[4]["error"]["type"] == "InferenceError"
    assert [r["outputs"][0]["data"] for r in loop.result("alike")["results"]] == [[2.0 * i] * 2 for i in range(1, 7)]


def test_an_expired_request_is_revoked_not_answered(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    old = loop.request("old", inputs=tensor(1, 1))
    old.expires = datetime.now(timezone.utc) - timedelta(seconds=1)
    rig.batcher.add("m", old)
    rig.batcher.add("m", loop.request("fresh", inputs=tensor(1, 1)))
    loop.start()
    assert loop.result("fresh")["outputs"][0]["data"] == [2.0, 2.0]
    assert ("revoked",) in old.events
    assert not rig.client.exists(loop.app.backend.get_key_for_task("old"))


def test_a_batch_for_a_model_no_longer_here_goes_back_to_its_queue(rig, loop):
    rig.batcher.open("gone", BatchPolicy(4, 0.0))  # buffered, but the manager holds no copy
    rig.batcher.add("gone", loop.request("r1", model_id="gone", inputs=tensor(1, 1)))
    loop.start()
    for _ in range(250):
        if rig.consumer.requeued:
            break
        threading.Event().wait(0.02)
    assert [p.req.id for p in rig.consumer.requeued] == ["r1"]
    assert not rig.client.exists(loop.app.backend.get_key_for_task("r1"))


def test_results_are_pushed_to_their_producers_reply_lists_and_nowhere_else(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    keys = rig.store.keys
    mine, other = keys.reply_list("a" * 32), keys.reply_list("b" * 32)
    foreign = f"{keys.kombu_prefix}models"  # a reply_to naming any other key is ignored
    reqs = [loop.request("r1", inputs=tensor(1, 1)), loop.request("r2", inputs=tensor(-1, -1)),
            loop.request("r3", inputs=tensor(3, 3)), loop.request("r4", inputs=tensor(4, 4)),
            loop.request("r5", inputs=tensor(5, 5))]  # fmt: skip
    for req, reply_to in zip(reqs, [mine, mine, other, foreign, "6f1c2b4e-celery-thread-oid"]):
        req.reply_to = reply_to
        rig.batcher.add("m", req)
    loop.start()
    for req in reqs:
        loop.result(req.id)
    replies = {k: [json.loads(v) for v in rig.client.lrange(k, 0, -1)] for k in (mine, other)}
    assert [(m["task_id"], m["status"]) for m in replies[mine]] == [("r1", "SUCCESS"), ("r2", "FAILURE")]
    assert [m["result"]["outputs"][0]["data"] for m in replies[other]] == [[6.0, 6.0]]
    assert 0 < rig.client.ttl(mine) <= 300  # the list of a producer gone expires by itself
    assert rig.client.type(foreign) == b"hash" and not rig.client.exists("6f1c2b4e-celery-thread-oid")


def test_a_reply_list_of_the_wrong_type_fails_neither_the_result_nor_the_ack(rig, loop):
    rig.register("m", python_class=PICKY)
    rig.load("m")
    squatted = rig.store.keys.reply_list("c" * 32)
    rig.client.set(squatted, "not a list")
    req = loop.request("r1", inputs=tensor(2, 2))
    req.reply_to = squatted
    rig.batcher.add("m", req)
    loop.start()
    assert loop.result("r1")["outputs"][0]["data"] == [4.0, 4.0]
    for _ in range(250):
        if req._message.acknowledged:
            break
        threading.Event().wait(0.02)
    assert req._message.acknowledged and loop.stored_at_ack == {"r1": True}


def test_task_started_rides_with_the_completion_only_for_quick_models(rig, loop):
    """A model whose last batch predicted in under ACCEPT_APART_S gets its task-started events
    with the completion (the result is stored by then); a slower one's go out before predict."""
    rig.register("fast", python_class=PICKY)
    rig.register("slow", delay=0.02)
    rig.load("fast")
    rig.load("slow")
    stored_at_accept: dict[str, bool] = {}

    def request(task_id: str, model_id: str) -> FakeRequest:
        req = loop.request(task_id, model_id=model_id, inputs=tensor(1, 1))
        key = loop.app.backend.get_key_for_task(task_id)
        accept = req.on_accepted

        def on_accepted(pid: int, started: float) -> None:
            stored_at_accept[task_id] = bool(rig.client.exists(key))
            accept(pid, started)

        req.on_accepted = on_accepted
        return req

    loop.start()
    for task_id, model_id in [("f1", "fast"), ("f2", "fast"), ("s1", "slow"), ("s2", "slow")]:
        rig.batcher.add(model_id, request(task_id, model_id))
        loop.result(task_id)
    # the first batch of each model: no predict time known yet, so sent before predict
    assert stored_at_accept == {"f1": False, "f2": True, "s1": False, "s2": False}


def test_a_request_that_cannot_be_answered_fails_alone_and_its_batch_mates_are_answered(rig, loop):
    """Issue 21: a lone surrogate in a task id cannot become a Redis key. Before, the results of
    the whole batch were stored in one pipeline that failed as a whole: the batch stayed
    unacked for a visibility timeout (300 s), and the poison was redelivered forever. The
    intake refuses such ids (workers/strategy.py); this is the batch's own defence."""
    rig.register("m", python_class=PICKY)
    rig.load("m")
    reqs = [loop.request(f"r{i}", inputs=tensor(i, i)) for i in range(5)]
    poison = FakeRequest("X\ud800", {"inputs": tensor(1.0, 1.0)}, routing_key=rig.store.keys.model_queue("m"))
    for req in reqs[:2] + [poison] + reqs[2:]:  # all buffered before the loop runs: one batch of six
        rig.batcher.add("m", req)
    loop.start()
    for i in range(5):
        assert loop.result(f"r{i}")["outputs"][0]["data"] == [2.0 * i, 2.0 * i]
    for _ in range(250):  # acked right after the pipeline that stored the results
        if all(req._message.acknowledged for req in reqs + [poison]):
            break
        threading.Event().wait(0.02)
    assert all(req._message.acknowledged for req in reqs + [poison])  # none redelivered
    assert rig.metrics.rejected.labels("unanswerable")._value.get() == 1
    batches = loop.batch_events(6)
    assert [(b["size"], b["messages"]) for b in batches] == [(6, 6)]


def test_requests_of_one_batch_get_the_outputs_each_asked_for(rig, loop, tmp_path):
    import joblib
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from mesh.models import ModelInfo

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y)
    joblib.dump(model, tmp_path / "iris.joblib")
    rig.store.register_model("sk", ModelInfo(runtime="sklearn", uri=f"file://{tmp_path / 'iris.joblib'}"))
    rig.load("sk")
    rows = x[:2].tolist()
    body = [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": rows}]
    asks = {"a": None, "b": [{"name": "predict_proba"}], "c": ["decision_function", "predict"],
            "d": [{"name": "predict_proba"}], "bad": ["nope"]}  # fmt: skip
    for task_id, outputs in asks.items():  # all buffered before the loop runs: one batch
        kwargs = {"inputs": body} if outputs is None else {"inputs": body, "outputs": outputs}
        rig.batcher.add("sk", loop.request(task_id, "sk", **kwargs))
    loop.start()
    for task_id, outputs in asks.items():
        result = loop.result(task_id)
        if task_id == "bad":
            assert isinstance(result, Exception) and "no output 'nope'" in str(result)
            continue
        names = ["predict"] if outputs is None else [o["name"] if isinstance(o, dict) else o for o in outputs]
        assert [o["name"] for o in result["outputs"]] == names
        for o in result["outputs"]:
            expected = getattr(model, o["name"])(np.asarray(rows))
            np.testing.assert_allclose(np.asarray(o["data"]).reshape(o["shape"]), expected)
    batches = loop.batch_events(5)
    assert [(b["messages"], b["failed"]) for b in batches] == [(5, 1)]
    # the signature the loading worker recorded for get_model_metadata
    signature = rig.store.get_signature("sk")
    assert signature.runtime == "sklearn" and [t.shape for t in signature.inputs] == [[-1, 4]]
    assert {t.name for t in signature.outputs} == {"predict", "predict_proba", "predict_log_proba", "decision_function"}


def test_a_failed_request_does_not_keep_its_model_alive(rig, loop):
    """A request's error kept with its traceback held the frames that held the loaded model:
    a reference cycle only a full GC frees, so every evicted model a bad request had been
    sent to stayed in memory (soak: dozens of them, hundreds of MB). With the cyclic GC off,
    the model must go as soon as the worker lets go of it."""
    rig.register("m", python_class=PICKY)
    rig.load("m")
    model = weakref.ref(rig.manager._entries["m"].loaded.model)
    rig.batcher.add("m", loop.request("bad-tensor", inputs=[{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                             "data": [1.0]}]))  # fmt: skip
    rig.batcher.add("m", loop.request("negative", inputs=tensor(-1.0, 1.0)))
    rig.batcher.add("m", loop.request("good", inputs=tensor(1.0, 1.0)))
    gc.disable()
    try:
        loop.start()
        assert isinstance(loop.result("bad-tensor"), Exception)
        assert "negative input rejected" in str(loop.result("negative"))
        assert loop.result("good")["outputs"][0]["data"] == [2.0, 2.0]
        loop.close()  # its thread's frames go with it
        rig.manager.request_unload("m")
        rig.events.wait_for(("unloaded", "m"))
        assert model() is None
    finally:
        gc.enable()


def test_the_flower_summary_of_a_result_is_short_whatever_the_outputs():
    import numpy as np

    from workers.inference import Message, Unit, _summary

    def summary(outputs):
        return _summary(Message(None, [Unit(outputs=outputs)]))

    assert summary({"label": np.array([3]), "p": np.array([[0.5, 0.25]], dtype=np.float32)}) == (
        "{'label': [3], 'p': [0.5, 0.25]}"
    )
    many = summary({f"out{i}": np.random.rand(100) for i in range(20)})
    assert len(many) <= 256 and many.startswith("{'out0': [")
    # strings (and objects) keep saferepr, which shortens each long string in place
    text = summary({"text": np.array(["x" * 10_000], dtype=object)})
    assert len(text) <= 300 and text.startswith("{'text': ['xxx")
