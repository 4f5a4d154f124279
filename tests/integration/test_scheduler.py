"""The beat scheduler against real workers.

Most tests call the rebalance run directly in the test process (`mesh.control.rebalance.rebalance`
with the test's app and store: exactly what the `mesh.rebalance` task does), so each step is
driven and observed deterministically, with planner settings scaled to a test's seconds. One
test starts a real `celery beat` to prove the schedule fires and a worker runs it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from celery.result import AsyncResult

from mesh.control.rebalance import Rebalancer, RebalanceReport, cluster_store, rebalance
from mesh.models import BatchingConfig, CopyState, ModelInfo, ModelState, WorkerState
from mesh.policy.planner import PlannerSettings
from mesh.tools.dashboard import render_status, status_text
from mesh.tools.launcher import start_beat, wait_for

MB = 1_000_000
X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}  # y = 10


def sized(tmp_path: Path, name: str, *, size: int = 10 * MB, delay: float = 0.0, **info) -> ModelInfo:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"size": size, "delay": delay}))
    return ModelInfo(
        runtime="python", uri=f"file://{spec}", python_class="tests.integration.sched_models:Sized",
        size_bytes=size, batching=BatchingConfig(max_batch_size=8, max_batch_delay_ms=2), **info,
    )  # fmt: skip


def planner(**kw) -> PlannerSettings:
    """Rules at test speed: heartbeats every 0.5 s, so seconds stand for minutes."""
    base = dict(
        scale_up_rps_per_copy=5.0, churn_age_s=1.0, pending_action_ttl_s=3.0, stale_copy_s=10.0,
        copy_idle_s=1e9, second_copy_min_age_s=1e9, proactive_loading=False,
        default_model_size_bytes=10 * MB,
    )  # fmt: skip
    base.update(kw)
    return PlannerSettings(**base)


def copies_of(client, model_id: str) -> dict[str, str]:
    return {c.worker: c.state.value for c in client.get_model_status(model_id).copies}


def holders(client, model_id: str) -> set[str]:
    """Workers whose heartbeat lists the model as loaded."""
    return {w.name for w in client.list_workers() for m in w.models if m.model_id == model_id}


def load_and_wait(client, model_id: str) -> str:
    status = client.ensure_loaded(model_id, sync=True, timeout=60)
    assert status.state is ModelState.LOADED, status
    return wait_for(lambda: next(iter(holders(client, model_id)), None), 10, what=f"{model_id} in a heartbeat")


class Traffic(threading.Thread):
    """Keeps `window` requests in flight against one model until stopped; collects every
    result handle so the test can check that each one was answered."""

    def __init__(self, client, model_id: str, window: int = 16) -> None:
        super().__init__(daemon=True)
        self.client, self.model_id, self.window = client, model_id, window
        self.sent: list[AsyncResult] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                batch = [self.client.infer(model_id=self.model_id, inputs=[X]) for _ in range(self.window)]
                self.sent.extend(batch)
                for r in batch:
                    r.get(timeout=120)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> list[AsyncResult]:
        self.stopping.set()
        self.join(timeout=180)
        assert not self.is_alive(), "traffic thread did not finish"
        assert self.error is None, f"a request failed: {self.error!r}"
        return self.sent


def all_answered(results: list[AsyncResult], timeout: float) -> None:
    for r in results:
        out = r.get(timeout=timeout)
        assert out["outputs"][0]["data"] == [10.0], out


# ----------------------------------------------------------------------------- leader lock


def fake_worker(client, name: str, capacity: int = 100 * MB) -> None:
    """A heartbeat without a process: its commands wait in its queue, which is all the lock
    tests need (they count what the scheduler sends)."""
    now = time.time()
    client.store.write_heartbeat(
        WorkerState(name=name, host="h", pid=1, capacity_bytes=capacity, used_bytes=0,
                    started_at=now, updated_at=now),
        ttl_s=60,
    )  # fmt: skip


def test_leader_lock_one_run_at_a_time_and_no_double_action(client, tmp_path):
    fake_worker(client, "solo@h")
    client.register_model("pin", sized(tmp_path, "pin", min_copies=1))
    r = Rebalancer(client.app, cluster_store(client.app, client.store, client.settings), planner=planner())
    token = r.acquire()
    assert token is not None
    skipped = rebalance(client.app, client.store, planner=planner())
    assert not skipped.ran and "leader lock" in skipped.reason
    r.release(token)
    first = rebalance(client.app, client.store, planner=planner())
    assert first.ran and first.counts == {"load:min-copies": 1}
    assert copies_of(client, "pin") == {"solo@h": "LOADING"}
    # a second run right after (a second beat, a redelivered message) does not send it again:
    # the load is pending in the scheduler's history until the heartbeat shows it
    second = rebalance(client.app, client.store, planner=planner())
    assert second.ran and second.counts == {}
    queue = client.keys.queue_list_keys(client.keys.worker_queue("solo@h"), [0, 5])
    assert sum(client.store.r.llen(k) for k in queue) == 1
    last = RebalanceReport.model_validate_json(client.store.r.get(client.keys.rebalance_last))
    assert last.ran and last.workers == 1


def test_dead_workers_are_forgotten_with_their_copy_records(client, tmp_path):
    client.register_model("m", sized(tmp_path, "m"))
    fake_worker(client, "live@h")
    r = client.store.r
    r.sadd(client.keys.workers, "gone@h")  # listed, but its heartbeat expired
    client.store.mark_copy("m", "gone@h", CopyState.LOADED)
    report = rebalance(client.app, client.store, planner=planner())
    assert report.dead_workers == 1
    assert report.counts.get("forget_worker") == 1 and report.counts.get("drop_copy:dead-worker") == 1
    assert r.smembers(client.keys.workers) == {b"live@h"}
    assert copies_of(client, "m") == {}


# ----------------------------------------------------------------------------- copies from load


def test_hot_model_gets_a_second_copy_and_gives_it_back_when_idle_and_space_is_needed(
    client, workers, tmp_path
):
    cap = str(25 * MB)  # two 10 MB models per worker
    workers("w1", MESH_WORKER_CAPACITY_BYTES=cap)
    workers("w2", MESH_WORKER_CAPACITY_BYTES=cap)
    client.register_model("hot", sized(tmp_path, "hot", max_copies=2))
    client.register_model("f1", sized(tmp_path, "f1"))
    client.register_model("f2", sized(tmp_path, "f2"))
    for m in ("hot", "f1", "f2"):
        load_and_wait(client, m)
    ps = planner()

    traffic = Traffic(client, "hot")
    traffic.start()

    def scaled():
        rebalance(client.app, client.store, planner=ps)
        return len(holders(client, "hot")) == 2 and all(s == "LOADED" for s in copies_of(client, "hot").values())

    wait_for(scaled, 60, interval=0.3, what="a second copy of the hot model")
    assert len(copies_of(client, "hot")) == 2
    results = traffic.stop()
    assert len(results) > 0

    # idle now: once the heartbeats show no traffic, the second copy is surplus
    wait_for(lambda: all(m.request_rate == 0 for w in client.list_workers() for m in w.models if m.model_id == "hot"),
             20, what="the hot model's rate to fall to 0")  # fmt: skip
    # space is needed: a pinned model must load and both workers are full. The surplus hot
    # copy goes, not f1 or f2 (each a model's only copy, although used longer ago)
    client.register_model("pin", sized(tmp_path, "pin", min_copies=1))
    reports: list[RebalanceReport] = []

    def pinned():
        reports.append(rebalance(client.app, client.store, planner=ps))
        return copies_of(client, "pin") and all(s == "LOADED" for s in copies_of(client, "pin").values())

    wait_for(pinned, 60, interval=0.3, what="the pinned model to load")
    counts = sum((Counter(r.counts) for r in reports), Counter())
    assert counts["unload:space"] == 1 and counts["load:min-copies"] == 1
    assert len(copies_of(client, "hot")) == 1
    wait_for(lambda: len(holders(client, "hot")) == 1, 10, what="the heartbeats to show one hot copy")
    assert holders(client, "f1") and holders(client, "f2")
    all_answered(results, 30)
    # the hot model still answers on its remaining copy
    all_answered([client.infer(model_id="hot", inputs=[X])], 30)


# ----------------------------------------------------------------------------- worker failures


def test_sigkill_models_move_and_every_request_is_answered(client, workers, tmp_path):
    env = {"MESH_VISIBILITY_TIMEOUT_S": "10"}
    w1 = workers("w1", **env)
    client.register_model("slow", sized(tmp_path, "slow", delay=0.1))  # 8 per batch: 80 req/s
    assert load_and_wait(client, "slow") == w1.full_name
    w2 = workers("w2", **env)
    ps = planner(proactive_loading=True)

    results = [client.infer(model_id="slow", inputs=[X]) for _ in range(200)]
    wait_for(lambda: sum(r.ready() for r in results) >= 8, 60, what="the first answers")
    rebalance(client.app, client.store, planner=ps)  # the scheduler has seen the model in use
    w1.kill()
    in_flight = sum(not r.ready() for r in results)
    assert in_flight > 0  # some were queued or held (unacked) by the killed worker

    def all_done():
        rebalance(client.app, client.store, planner=ps)
        return all(r.ready() for r in results)

    # queued requests are answered once the model is placed on w2; the killed worker's unacked
    # ones come back after the visibility timeout (10 s) and the restore sweep
    wait_for(all_done, 120, interval=0.5, what="every request to be answered")
    all_answered(results, 5)
    assert copies_of(client, "slow") == {w2.full_name: "LOADED"}
    assert w1.full_name not in {w.name for w in client.list_workers()}
    assert not client.store.r.sismember(client.keys.workers, w1.full_name)


def test_sigterm_drains_first_with_no_failed_request(client, workers, tmp_path):
    w1 = workers("w1")
    client.register_model("m", sized(tmp_path, "m", delay=0.01))
    assert load_and_wait(client, "m") == w1.full_name
    w2 = workers("w2")
    ps = planner(proactive_loading=True)
    stop_beat = threading.Event()

    def beat():  # what celery beat does, at test speed
        while not stop_beat.is_set():
            rebalance(client.app, client.store, planner=ps)
            stop_beat.wait(0.5)

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    traffic = Traffic(client, "m", window=8)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.sent) >= 40, 60, what="traffic to flow")
        w1.stop()
        assert w1.returncode is not None
        wait_for(lambda: copies_of(client, "m").get(w2.full_name) == "LOADED", 60, what="the copy on w2")
        sent = len(traffic.sent)
        wait_for(lambda: len(traffic.sent) >= sent + 40, 60, what="traffic to flow on w2")
    finally:
        results = traffic.stop()
        stop_beat.set()
        ticker.join(timeout=30)
    all_answered(results, 30)
    assert copies_of(client, "m") == {w2.full_name: "LOADED"}


# ----------------------------------------------------------------------------- celery beat


def test_celery_beat_schedules_the_rebalance(client, workers, mesh_env, tmp_path):
    env = {**mesh_env, "MESH_REBALANCE_INTERVAL_S": "1"}
    w1 = workers("w1", MESH_REBALANCE_INTERVAL_S="1")
    # a pinned model: nothing but a scheduler run loads it (no request, no ensure_loaded)
    client.register_model("pin", sized(tmp_path, "pin", min_copies=1))
    beat = start_beat(env, tmp_path / "beat-logs")
    try:
        wait_for(lambda: copies_of(client, "pin").get(w1.full_name) == "LOADED", 60, interval=0.2,
                 what=f"the beat-scheduled rebalance to load the pinned model; beat log:\n{beat.tail()}")  # fmt: skip
        last = RebalanceReport.model_validate_json(client.store.r.get(client.keys.rebalance_last))
        assert last.ran
        assert "mesh.rebalance" in beat.tail(200)
    finally:
        beat.stop()


# ----------------------------------------------------------------------------- mesh status


def test_status_view_shows_workers_and_models(client, workers, tmp_path):
    w1 = workers("w1")
    client.register_model("m", sized(tmp_path, "m"))
    client.register_model("idle", sized(tmp_path, "idle"))
    load_and_wait(client, "m")
    all_answered([client.infer(model_id="m", inputs=[X])], 30)
    text = status_text(client, width=160)
    assert w1.full_name in text
    assert "m" in text and "idle" in text and "Loaded" in text and "Standby" in text
    assert render_status(client) is not None


@pytest.fixture(autouse=True)
def _no_leftover_lock(client):
    yield
    client.store.r.delete(client.keys.rebalance_lock)
