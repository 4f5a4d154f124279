"""workers/worker.py: MeshWorker built on a fake Celery consumer and a real Redis, never
started (no threads): commands, requests for models not served here, the orphan watch's reload
of a model that left, and copies re-announced after their records vanished."""

from __future__ import annotations

import time

import pytest

from mesh.app import create_app
from mesh.errors import ModelNotFound
from mesh.models import Command, CopyInfo, CopyState, ModelInfo, WorkerState
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from tests.unit.fakes import FakeConsumer, FakeRequest
from workers.batcher import BatchPolicy
from workers.worker import MeshWorker

NAME = "w1@test"
OTHER = "w2@test"
INFO = ModelInfo(runtime="sklearn", uri="file:///models/m.joblib")


class FakeTaskConsumer:
    auto_declare = True

    def consuming_from(self, queue: str) -> bool:
        return False


class FakeCeleryConsumer:
    """The Celery consumer MeshWorker is built on; `call_soon` only collects."""

    def __init__(self, app) -> None:
        self.app = app
        self.hostname = NAME
        self.ready: list[tuple] = []
        self.task_consumer = FakeTaskConsumer()
        self.qos = None
        self.event_dispatcher = None

    def call_soon(self, fn, *args) -> None:
        self.ready.append((fn, args))

    def run_ready(self) -> None:
        todo, self.ready = self.ready, []
        for fn, args in todo:
            fn(*args)

    def add_task_queue(self, queue: str) -> None:
        pass

    def cancel_task_queue(self, queue: str) -> None:
        pass


class RecordingManager:
    def __init__(self, records=None, loaded=None) -> None:
        self.calls: list[tuple] = []
        self.records = records or {}
        self.loaded = list(self.records) if loaded is None else loaded

    def request_load(self, model_id: str) -> None:
        self.calls.append(("load", model_id))

    def request_unload(self, model_id: str, fail_with=None) -> None:
        self.calls.append(("unload", model_id, fail_with))

    def loaded_records(self):
        return dict(self.records)

    def loaded_ids(self):
        return list(self.loaded)


class NowRecordingConsumer(FakeConsumer):
    def requeue(self, items, now: bool = False, wait_s: float = 0.0) -> None:
        super().requeue(items, now, wait_s)
        self.log.append(("now", now))


@pytest.fixture
def worker(redis_url, prefix, monkeypatch, tmp_path):
    monkeypatch.setenv("MESH_METRICS_PORT", "0")
    monkeypatch.setenv("MESH_DISK_CACHE_DIR", str(tmp_path / "cache"))
    # the app's prefix and URL must win: these would point the worker elsewhere
    monkeypatch.setenv("MESH_PREFIX", "notthisprefix")
    monkeypatch.setenv("MESH_REDIS_URL", "redis://127.0.0.1:1/0")
    app = create_app(MeshSettings(prefix=prefix, redis_url=redis_url))
    celery_consumer = FakeCeleryConsumer(app)
    w = MeshWorker(celery_consumer)
    w.sent = []
    w._send_command = lambda worker_name, cmd: w.sent.append((worker_name, cmd))
    real_manager = w.manager
    yield w
    real_manager.shutdown()
    w.batcher.stop()
    w.metrics.close()
    w._control.shutdown()
    w.store.r.close()
    app.close()


def heartbeat(store, name: str) -> None:
    now = time.time()
    store.write_heartbeat(
        WorkerState(name=name, host="h", pid=2, capacity_bytes=10**9, used_bytes=0, started_at=now, updated_at=now),
        ttl_s=30,
    )


def push_request(worker: MeshWorker, model_id: str) -> None:
    queue = worker.keys.model_queue(model_id)
    worker.store.r.lpush(worker.keys.queue_list_keys(queue, worker.priority_steps)[0], b'{"raw": "request"}')


def test_the_worker_is_wired_from_the_app_not_the_environment(worker, prefix):
    assert worker.name == NAME
    assert worker.settings.prefix == prefix and worker.keys == Keys(prefix)
    assert worker.store.r.ping()  # the app's Redis, not MESH_REDIS_URL's
    assert worker.priority_steps == [0, 5]  # from the app's broker_transport_options
    assert worker.consumer.keys is worker.keys and worker.consumer.name == NAME
    assert not worker.heartbeat.is_alive() and not worker.inference.is_alive()  # never started


# ------------------------------------------------------------------ commands


def test_a_load_command_asks_the_manager_for_the_load(worker):
    worker.manager = RecordingManager()
    worker.on_command(Command(op="load", model_id="m"))
    assert worker.manager.calls == [("load", "m")]


def test_a_wake_command_does_nothing(worker):
    worker.manager = RecordingManager()
    worker.on_command(Command(op="wake", model_id="m"))
    assert worker.manager.calls == []


def test_an_unload_that_fails_queued_requests_passes_model_not_found(worker):
    worker.manager = RecordingManager()
    worker.on_command(Command(op="unload", model_id="m", fail_queued=True, reason="model 'm' was deleted"))
    worker.on_command(Command(op="unload", model_id="n", fail_queued=True))
    worker.on_command(Command(op="unload", model_id="k"))
    (_, m, err_m), (_, n, err_n), (_, k, err_k) = worker.manager.calls
    assert (m, n, k) == ("m", "n", "k")
    assert isinstance(err_m, ModelNotFound) and str(err_m) == "model 'm' was deleted"
    assert isinstance(err_n, ModelNotFound) and "'n' was unregistered" in str(err_n)
    assert err_k is None  # a plain unload: queued requests wait for another copy


def test_a_stale_unload_of_a_model_registered_again_fails_nothing(worker):
    """An unload names the generation of the registration it is about (its record's
    created_at): read after the model was registered again, it is stale."""
    old, _ = worker.store.register_model("m", INFO)
    worker.store.unregister_model("m")
    new, _ = worker.store.register_model("m", INFO)
    assert new.created_at != old.created_at
    stale = Command(op="unload", model_id="m", fail_queued=True, generation=old.created_at)
    worker.manager = RecordingManager()  # nothing loaded here
    worker.on_command(stale)
    assert worker.manager.calls == []
    worker.manager = RecordingManager({"m": new})  # a copy of the new registration stays
    worker.on_command(stale)
    assert worker.manager.calls == []
    worker.manager = RecordingManager({"m": old})  # a copy of the old one retires, failing nothing
    worker.on_command(stale)
    assert worker.manager.calls == [("unload", "m", None)]


def test_an_unload_of_the_generation_unregistered_still_fails_queued_requests(worker):
    old, _ = worker.store.register_model("m", INFO)
    worker.store.unregister_model("m")
    worker.manager = RecordingManager({"m": old})
    worker.on_command(Command(op="unload", model_id="m", fail_queued=True, generation=old.created_at))
    ((_, m, err),) = worker.manager.calls
    assert m == "m" and isinstance(err, ModelNotFound)


# ------------------------------------------------------------------ requests


def test_a_request_for_a_model_not_buffered_here_goes_back_to_its_queue_at_once(worker):
    worker.consumer = NowRecordingConsumer()
    req = FakeRequest("r1", {"inputs": []})
    worker.on_request("m", req)
    unknown = FakeRequest("r2", {"inputs": []})
    worker.on_request(None, unknown)
    assert worker.consumer.log == [("requeue", ["r1"]), ("now", True), ("requeue", ["r2"]), ("now", True)]


def test_a_request_for_a_served_model_is_buffered(worker):
    worker.consumer = NowRecordingConsumer()
    worker.batcher.open("m", BatchPolicy(max_batch_size=4, max_batch_delay_s=0.0))
    worker.on_request("m", FakeRequest("r1", {"items": [1, 2]}), items=2, high=True)
    assert worker.consumer.log == []
    assert [(p.req.id, p.items, p.high) for p in worker.batcher.close("m")] == [("r1", 2, True)]


# ------------------------------------------------------------------ orphan watch


def test_a_model_that_left_with_requests_waiting_and_no_copy_is_loaded_elsewhere(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    push_request(worker, "m")
    worker.copy_unloaded("m", unregistered=False)
    assert worker.sent == [(OTHER, Command(op="load", model_id="m"))]
    status = worker.store.model_status("m")
    assert [(c.worker, c.state) for c in status.copies] == [(OTHER, CopyState.LOADING)]
    assert worker.store.r.get(worker.keys.load_claim("m")) == OTHER.encode()
    assert "m" in worker._recently_unloaded  # and watched for a while


def test_a_model_that_left_and_is_placed_here_again_loads_without_a_command(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, NAME)  # the only live worker: the placement picks this one
    worker.manager = RecordingManager()
    push_request(worker, "m")
    worker.copy_unloaded("m", unregistered=False)
    assert worker.sent == [] and worker.manager.calls == [("load", "m")]
    assert worker.store.r.get(worker.keys.load_claim("m")) == NAME.encode()


def test_a_model_that_left_with_an_empty_queue_is_not_reloaded(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    worker.copy_unloaded("m", unregistered=False)
    assert worker.sent == []
    assert worker.store.r.exists(worker.keys.load_claim("m")) == 0


def test_a_model_that_left_with_a_copy_elsewhere_is_not_reloaded(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    worker.store.mark_copy("m", OTHER, CopyState.LOADED)
    push_request(worker, "m")
    worker.copy_unloaded("m", unregistered=False)
    assert worker.sent == []


def test_an_unregistered_model_is_not_reloaded_and_its_queue_is_declared_afresh(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    push_request(worker, "m")
    queue = worker.keys.model_queue("m")
    worker.consumer._declared.add(queue)
    worker.copy_unloaded("m", unregistered=True)
    worker.consumer.consumer.run_ready()  # the consumer thread's turn
    assert worker.sent == []
    assert queue not in worker.consumer._declared
    assert "m" not in worker._recently_unloaded


def test_a_shutting_down_worker_leaves_the_reload_to_others(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    push_request(worker, "m")
    worker.shutting_down = True
    worker.copy_unloaded("m", unregistered=False)
    assert worker.sent == []


def test_requests_arriving_after_a_model_left_are_caught_by_the_fast_watch(worker):
    worker.store.register_model("m", INFO)
    heartbeat(worker.store, OTHER)
    worker.copy_unloaded("m", unregistered=False)  # queue empty then
    assert worker.sent == []
    push_request(worker, "m")  # a producer that saw the copy a moment ago
    worker.watch_fresh_orphans()
    assert worker.sent == [(OTHER, Command(op="load", model_id="m"))]


# ------------------------------------------------------------------ copies whose records vanished


def test_a_copy_whose_record_vanished_is_announced_again(worker):
    record, _ = worker.store.register_model("m", INFO)
    worker.manager = RecordingManager({"m": record})
    assert worker.store.copies_recorded(["m"], NAME) == {"m": False}
    worker.reassert_copies()
    raw = worker.store.r.hget(worker.keys.copies("m"), NAME)
    assert raw is not None and CopyInfo.model_validate_json(raw).state is CopyState.LOADED


def test_a_copy_of_a_model_registered_again_differently_is_not_announced(worker):
    record, _ = worker.store.register_model("m", INFO)
    worker.store.unregister_model("m")
    worker.store.register_model("m", ModelInfo(runtime="onnx", uri="file:///models/m.onnx"))
    worker.manager = RecordingManager({"m": record})
    worker.reassert_copies()
    assert worker.store.copies_recorded(["m"], NAME) == {"m": False}


def test_a_copy_evicted_while_announced_is_removed_again(worker):
    record, _ = worker.store.register_model("m", INFO)
    worker.manager = RecordingManager({"m": record}, loaded=[])
    worker.reassert_copies()
    assert worker.store.copies_recorded(["m"], NAME) == {"m": False}


def test_no_copy_is_announced_while_shutting_down(worker):
    record, _ = worker.store.register_model("m", INFO)
    worker.manager = RecordingManager({"m": record})
    worker.shutting_down = True
    worker.reassert_copies()
    assert worker.store.copies_recorded(["m"], NAME) == {"m": False}
