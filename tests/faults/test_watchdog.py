"""The predict watchdog (issue 21, finding 7): a predict that hangs stalled every model of its
worker, while the worker's heartbeat kept it looking healthy. Now a predict call past its
model's timeout fails its batch with PredictTimeout, the copy is taken out of service, and a
new inference thread serves the other models (workers/inference.py, `_hung`).

A real worker process and `python`-runtime models (tests/faults/fault_models.py): `hang` sleeps
for minutes when its input holds HANG_VALUE, far past its 2 s timeout.
"""

from __future__ import annotations

import pytest

from mesh import MeshError, PredictTimeout
from mesh.tools.launcher import wait_for

from .fault_models import HANG_VALUE
from .helpers import X, copies_of, served_by, slow_info, wait_loaded

TIMEOUT_S = 2.0
HANG_S = 600.0  # the stuck thread outlives the test; the worker process is stopped after it
MARGIN_S = 15.0  # functional bound: the watchdog answers within the timeout and this margin


def test_a_hung_predict_fails_its_batch_and_the_other_models_keep_being_served(client, workers, tmp_path):
    mark = tmp_path / "hanging"
    workers("w1", MESH_PREDICT_TIMEOUT_S=60)  # the global default; the model's own 2 s wins
    client.register_model("hang", slow_info(tmp_path, "hang", hang=HANG_S, hang_mark=mark,
                                            predict_timeout_s=TIMEOUT_S))  # fmt: skip
    client.register_model("other", slow_info(tmp_path, "other"))
    wait_loaded(client, "hang")
    wait_loaded(client, "other")
    assert client.infer(model_id="other", inputs=[X]).get(timeout=30)  # both served before

    hung = client.infer(model_id="hang", inputs=[{**X, "data": [HANG_VALUE, 0.0, 0.0, 0.0]}])
    wait_for(mark.exists, timeout=30, what="the hanging predict to start")
    # during the hang (its thread sleeps for minutes): the other model is answered
    during = client.infer(model_id="other", inputs=[X])
    assert during.get(timeout=TIMEOUT_S + MARGIN_S)["outputs"][0]["data"] == [10.0]
    # the hung batch: the typed error, within the timeout and a margin
    with pytest.raises(PredictTimeout, match="ran past its timeout"):
        hung.get(timeout=TIMEOUT_S + MARGIN_S)
    # after: the other model still answers, and the hung model's next request is answered
    # too, clearly: the copy is out of service and this (only) worker has a failure record
    for r in [client.infer(model_id="other", inputs=[X]) for _ in range(5)]:
        assert r.get(timeout=30)["outputs"][0]["data"] == [10.0]
    try:  # refused at once (every live worker failed it), or answered
        assert client.infer(model_id="hang", inputs=[X]).get(timeout=60)["outputs"][0]["data"] == [10.0]
    except MeshError as exc:
        assert "ran past its timeout" in str(exc), exc


def test_after_a_hung_predict_a_new_copy_on_another_worker_serves_the_model(client, workers, tmp_path):
    """The hung copy is handled as a failed load: with a second worker, the model's next
    requests are served by a new copy there."""
    mark = tmp_path / "hanging"
    workers("w1")
    workers("w2")
    client.register_model("hang", slow_info(tmp_path, "hang", hang=HANG_S, hang_mark=mark,
                                            predict_timeout_s=TIMEOUT_S))  # fmt: skip
    wait_loaded(client, "hang")
    (first,) = copies_of(client, "hang")
    hung = client.infer(model_id="hang", inputs=[{**X, "data": [HANG_VALUE, 0.0, 0.0, 0.0]}])
    with pytest.raises(PredictTimeout):
        hung.get(timeout=TIMEOUT_S + MARGIN_S)
    results = [client.infer(model_id="hang", inputs=[X]) for _ in range(5)]
    assert [r.get(timeout=60)["outputs"][0]["data"] for r in results] == [[10.0]] * 5
    served = wait_for(lambda: {w: n for w, n in served_by(client, "hang").items() if n} or None,
                      timeout=30, what="a heartbeat with the new copy's requests")  # fmt: skip
    assert first not in served, (first, served)


def test_a_worker_with_too_many_hung_predicts_exits_for_its_supervisor(client, workers, tmp_path):
    """Each abandoned thread keeps a core and its model's memory: past MAX_STUCK_PREDICTS still
    hanging, the worker leaves (a warm shutdown that hands its models over)."""
    from workers.inference import MAX_STUCK_PREDICTS

    w = workers("w1")
    models = [f"hang{i}" for i in range(MAX_STUCK_PREDICTS + 1)]
    for model_id in models:
        client.register_model(model_id, slow_info(tmp_path, model_id, hang=HANG_S, predict_timeout_s=1.0))
        wait_loaded(client, model_id)
    for model_id in models[:-1]:
        with pytest.raises(PredictTimeout):
            client.infer(model_id=model_id, inputs=[{**X, "data": [HANG_VALUE, 0.0, 0.0, 0.0]}]).get(timeout=30)
    assert w.alive()  # MAX_STUCK_PREDICTS abandoned threads: it goes on
    last = client.infer(model_id=models[-1], inputs=[{**X, "data": [HANG_VALUE, 0.0, 0.0, 0.0]}])
    with pytest.raises(PredictTimeout):
        last.get(timeout=30)  # answered before the worker leaves
    wait_for(lambda: not w.alive(), timeout=60, what="the worker to exit")
    assert "exiting for the supervisor" in w.tail(200)
