"""workers/bootstep.py: which queues a mesh worker consumes at start (on the real Celery app's
queues), and the consumer step handing start/stop/shutdown to MeshWorker (no worker process)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import workers.worker
from mesh.app import create_app
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from workers.bootstep import MeshConsumerStep, MeshWorkerStep

HOSTNAME = "w1@test"


@pytest.fixture
def app(redis_url, prefix):
    a = create_app(MeshSettings(prefix=prefix, redis_url=redis_url))
    yield a
    a.close()


def consumed(app) -> set[str]:
    return set(app.amqp.queues.consume_from)


@pytest.mark.parametrize("control", ["true", "false"])
def test_without_q_only_the_private_queue_and_the_control_queue_are_consumed(app, prefix, monkeypatch, control):
    monkeypatch.setenv("MESH_WORKER_CONTROL_QUEUE", control)
    keys = Keys(prefix)
    assert app.amqp.queues._consume_from is None  # no -Q: Celery would consume every queue
    MeshWorkerStep(SimpleNamespace(app=app, hostname=HOSTNAME))
    expected = {keys.worker_queue(HOSTNAME)} | ({keys.control_queue} if control == "true" else set())
    assert consumed(app) == expected
    assert app.conf.task_default_queue not in consumed(app)


def test_with_q_the_private_queue_is_added_to_the_chosen_ones(app, prefix, monkeypatch):
    monkeypatch.setenv("MESH_WORKER_CONTROL_QUEUE", "false")
    keys = Keys(prefix)
    app.amqp.queues.select([f"{prefix}.extra"])  # as `celery worker -Q <prefix>.extra` does
    MeshWorkerStep(SimpleNamespace(app=app, hostname=HOSTNAME))
    assert consumed(app) == {f"{prefix}.extra", keys.worker_queue(HOSTNAME)}


class RecordingWorker:
    """Stands in for MeshWorker: the step under test only builds it and calls it."""

    built: list[RecordingWorker] = []

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.calls: list[str] = []
        RecordingWorker.built.append(self)

    def start(self) -> None:
        self.calls.append("start")

    def on_connection_lost(self) -> None:
        self.calls.append("on_connection_lost")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.fixture
def recording(monkeypatch):
    RecordingWorker.built = []
    monkeypatch.setattr(workers.worker, "MeshWorker", RecordingWorker)
    return RecordingWorker


def test_consumer_step_builds_the_mesh_worker_before_the_strategies(recording):
    consumer = SimpleNamespace(app=None, hostname=HOSTNAME)
    MeshConsumerStep(consumer)
    assert [w.consumer for w in recording.built] == [consumer]
    assert consumer.mesh is recording.built[0]
    assert consumer.mesh.calls == []  # built, not started
    # after the Tasks step, which builds the strategies that read consumer.mesh
    assert "celery.worker.consumer.tasks:Tasks" in {getattr(r, "name", r) for r in MeshConsumerStep.requires}


def test_consumer_step_hands_start_stop_and_shutdown_to_the_mesh_worker(recording):
    consumer = SimpleNamespace(app=None, hostname=HOSTNAME)
    step = MeshConsumerStep(consumer)
    step.start(consumer)
    step.stop(consumer)  # connection lost
    step.start(consumer)  # reconnected
    step.shutdown(consumer)
    assert consumer.mesh.calls == ["start", "on_connection_lost", "start", "shutdown"]
    assert len(recording.built) == 1  # one MeshWorker across reconnections
