"""Worker pools against real workers: two `celery worker` processes with different labels
(`MESH_WORKER_LABELS`), models that require one of them (docs/operations.md, "Worker pools").

A model requiring a label lands only on the worker that carries it, by the cold path (a first
request) and by the scheduler (a pinned model); a model requiring a label no live worker
carries is not loaded anywhere and says why in its status; a worker sent a load of a model it
may not hold refuses it and hands it to one that may.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.control.commands import send_command
from mesh.control.rebalance import rebalance
from mesh.models import BatchingConfig, Command, ModelInfo, ModelState
from mesh.policy.planner import PlannerSettings
from mesh.tools.dashboard import status_text
from mesh.tools.launcher import wait_for

MB = 1_000_000
X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}  # y = 10


def sized(tmp_path: Path, name: str, **info) -> ModelInfo:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"size": MB}))
    return ModelInfo(
        runtime="python", uri=f"file://{spec}", python_class="tests.integration.sched_models:Sized",
        size_bytes=MB, batching=BatchingConfig(max_batch_size=8, max_batch_delay_ms=2), **info,
    )  # fmt: skip


def holders(client, model_id: str) -> set[str]:
    """Workers whose heartbeat lists the model as loaded or loading."""
    return {
        w.name for w in client.list_workers()
        if model_id in w.loading or any(m.model_id == model_id for m in w.models)
    }  # fmt: skip


@pytest.fixture
def pool(client, workers):
    """Worker `a` offers env=a (zone=1), worker `b` offers env=b."""
    a = workers("pa", MESH_WORKER_LABELS="env=a,zone=1")
    b = workers("pb", MESH_WORKER_LABELS="env=b")
    return a.full_name, b.full_name


def test_workers_carry_their_labels_in_their_heartbeat(client, pool):
    a, b = pool
    labels = {w.name: w.labels for w in client.list_workers()}
    assert labels == {a: {"env": "a", "zone": "1"}, b: {"env": "b"}}
    text = status_text(client, width=240)  # `mesh status` names each worker's pool
    assert f"{a} [env=a,zone=1]" in text and f"{b} [env=b]" in text


def test_the_cold_path_places_a_model_only_on_a_worker_of_its_pool(client, pool, tmp_path):
    a, b = pool
    for i in range(3):
        client.register_model(f"ma{i}", sized(tmp_path, f"ma{i}"), required_labels={"env": "a"})
    client.register_model("mb", sized(tmp_path, "mb", required_labels={"env": "b"}))
    handles = [client.infer(model_id=m, inputs=[X]) for m in ("ma0", "ma1", "ma2", "mb")]
    for h in handles:
        assert h.get(timeout=60)["outputs"][0]["data"] == [10.0]
    for i in range(3):
        assert {c.worker for c in client.get_model_status(f"ma{i}").copies} == {a}
    assert {c.worker for c in client.get_model_status("mb").copies} == {b}
    cfg = client.get_effective_config("ma0").values["required_labels"]
    assert (cfg.value, cfg.source) == ({"env": "a"}, "api")


def test_a_model_no_live_worker_may_hold_says_why_and_is_not_loaded(client, pool, tmp_path):
    client.register_model("mc", sized(tmp_path, "mc"), required_labels={"env": "c"})
    handle = client.infer(model_id="mc", inputs=[X])  # accepted: it waits for a worker of its pool
    status = client.ensure_loaded("mc", sync=True, timeout=30)  # returns at once: nothing loads it
    assert status.state is ModelState.NOT_LOADED and not status.copies and not status.failed_copies
    assert status.reason == "NO_MATCHING_WORKER: needs env=c; live workers offer {env=a,zone=1}, {env=b}"
    # nothing tried to load it anywhere, and the scheduler does not either
    rebalance(client.app, client.store, planner=PlannerSettings(proactive_loading=False))
    assert holders(client, "mc") == set()
    assert client.get_model_status("mc").reason.startswith("NO_MATCHING_WORKER")
    assert handle.state == "PENDING"


def test_the_scheduler_places_a_pinned_model_only_in_its_pool(client, pool, tmp_path):
    a, b = pool
    client.register_model("pinned", sized(tmp_path, "pinned", min_copies=2, required_labels={"env": "b"}))
    ps = PlannerSettings(proactive_loading=False, default_model_size_bytes=MB)
    rebalance(client.app, client.store, planner=ps)
    wait_for(lambda: holders(client, "pinned") == {b}, 60, what="the pinned model on the env=b worker")
    # two copies wanted, one worker in its pool: it stays one, never on the other pool
    for _ in range(3):
        rebalance(client.app, client.store, planner=ps)
    assert {c.worker for c in client.get_model_status("pinned").copies} == {b}
    assert a not in holders(client, "pinned")


def test_a_worker_refuses_a_load_outside_its_pool_and_hands_it_over(client, pool, tmp_path):
    a, b = pool
    client.register_model("ma", sized(tmp_path, "ma"), required_labels={"env": "a"})
    send_command(client.store, b, Command(op="load", model_id="ma"))  # as a stale sender would
    wait_for(
        lambda: client.get_model_status("ma").state is ModelState.LOADED, 60, what="ma loaded where it may be"
    )
    assert {c.worker for c in client.get_model_status("ma").copies} == {a}
    assert b not in holders(client, "ma")
