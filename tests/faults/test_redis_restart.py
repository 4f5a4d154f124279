"""Redis restarts (docs/reliability.md): with persistence the registry survives and every process
reconnects by itself; with Redis emptied, workers announce their copies again and the registry
comes back from the model repository.

Each test runs its own redis-server (never the shared one): it is stopped, restarted and
flushed here.

The restart under load found four ways to lose or strand a request, each fixed where it
happens: a message popped just as Redis went away (mesh/broker/transport.py puts it back), a worker
stopped by kombu's AttributeError while closing its dead channel (mesh/broker/transport.py), a batch
failed because Redis answered "LOADING" while storing its results, and producers whose result
subscription never came back (both mesh/broker/results.py). docs/reliability.md.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mesh import MeshClient, ModelNotFound
from mesh.control.registry import MeshRegistry
from mesh.control.repository import sync_repository
from mesh.models import ModelState
from mesh.policy.repository import READY_MARKER
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import wait_for
from tests.integration.test_foundation import answer, seed_tensor

from .helpers import X, copies_of, outcomes, slow_info, wait_loaded


def registry_of(c: MeshClient) -> MeshRegistry:
    """The registry a sync writes to, from a client's own parts (its caches see the changes)."""
    return MeshRegistry(c.app, c.store, vmodels=c.vmodels, router=c.router)


class PrivateRedis:
    """A persistent redis-server of one test, restartable on the same port and directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server = EmbeddedRedis(directory, persist=True)
        self.url = self.server.start(timeout=20)

    def restart(self) -> None:
        port = self.server.port
        self.server.stop()  # SHUTDOWN: the append-only file is flushed first
        self.server = EmbeddedRedis(self.directory, port=port, persist=True)
        assert self.server.start(timeout=20) == self.url

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    # requested before `workers` in the tests, so it stops after the workers
    server = PrivateRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture
def pclient(private_redis: PrivateRedis, prefix: str) -> Iterator[MeshClient]:
    c = MeshClient(redis_url=private_redis.url, prefix=prefix)
    try:
        yield c
    finally:
        c.close()


class Steady(threading.Thread):
    """Sends requests until stopped, through the restart: a send that raises (Redis is down)
    was not sent; every send that returned must be answered."""

    def __init__(self, client: MeshClient, vmodel_id: str) -> None:
        super().__init__(daemon=True)
        self.client, self.vmodel_id = client, vmodel_id
        self.sent: list = []
        self.refused: list[str] = []  # sends that raised (Redis down): not sent
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sent.append(self.client.infer(vmodel_id=self.vmodel_id, inputs=[X]))
            except Exception as exc:  # reported by the test
                self.refused.append(f"{type(exc).__name__}: {exc}")
                self.stopping.wait(0.05)

    def stop(self) -> list:
        self.stopping.set()
        self.join(timeout=60)
        assert not self.is_alive()
        return self.sent


def test_restart_under_load_keeps_the_registry_and_answers_every_sent_request(
    private_redis, workers, pclient, tmp_path
):
    url = private_redis.url
    w = workers("w1", MESH_REDIS_URL=url, MESH_VISIBILITY_TIMEOUT_S="10")
    # 30 ms per batch of 8: the producer outpaces the worker, so at the restart a backlog
    # waits in Redis and the worker holds a full prefetch of unacked requests
    pclient.register_model("m1", slow_info(tmp_path, "m1", delay=0.03))
    pclient.set_vmodel("v", "m1")
    wait_loaded(pclient, "m1")
    models_before = pclient.list_models()
    vmodels_before = pclient.list_vmodels()

    traffic = Steady(pclient, "v")
    traffic.start()
    try:
        unacked = pclient.keys.kombu_prefix + "unacked"
        wait_for(lambda: pclient.store.queue_depth("m1", [0, 5]) > 0 and pclient.store.r.hlen(unacked) > 0,
                 60, interval=0.02, what="a backlog before the restart")  # fmt: skip
        held = pclient.store.r.hlen(unacked)
        private_redis.restart()
        sent_at_restart = len(traffic.sent)
        # producers and the worker reconnect by themselves: new sends go through and are answered
        wait_for(lambda: len(traffic.sent) >= sent_at_restart + 50, 90, what="traffic after the restart")
    finally:
        results = traffic.stop()

    assert held > 0
    # sends failed only while Redis was down, with connection errors (never "not found")
    assert not [e for e in traffic.refused if "NotFound" in e], traffic.refused[:5]
    # registered state survived the restart unchanged
    after = [m.model_dump() for m in pclient.list_models()]
    before = [m.model_dump() for m in models_before]
    assert after == before, [(k, b.get(k), a.get(k)) for a, b in zip(after, before) for k in a if a.get(k) != b.get(k)]
    assert [v.model_dump() for v in pclient.list_vmodels()] == [v.model_dump() for v in vmodels_before]
    # every request whose send returned is answered, including those in flight at the restart
    # (queued ones were persisted; ones a worker held come back after the visibility timeout)
    counts = outcomes(results, timeout=120)
    assert counts == {"answered": len(results), "wrong": 0, "failed": 0}, counts
    assert w.alive()
    status = pclient.get_model_status("m1")
    assert status.state is ModelState.LOADED and [c.worker for c in status.copies] == [w.full_name]


def test_flushed_redis_workers_reannounce_and_the_repository_restores_the_registry(
    private_redis, workers, prefix, tmp_path, svm_path, seed_input
):
    repo = tmp_path / "repo"
    (repo / "digits" / "1").mkdir(parents=True)
    shutil.copy(svm_path, repo / "digits" / "1" / "model.joblib")
    (repo / "digits" / "1" / READY_MARKER).touch()
    client = MeshClient(redis_url=private_redis.url, prefix=prefix)
    try:
        w = workers("w1", MESH_REDIS_URL=private_redis.url)
        report = sync_repository(registry_of(client), model_dir=str(repo))
        assert report.registered == ["digits@1"], report
        response = client.infer(vmodel_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)
        assert (response["model_name"], answer(response)) == ("digits@1", 8)
        assert copies_of(client, "digits@1") == {w.full_name: "LOADED"}

        private_redis.client().flushall()
        # heartbeats re-create the worker's keys within an interval
        wait_for(lambda: [x.name for x in client.list_workers()] == [w.full_name], 30,
                 what="the worker's heartbeat after FLUSHALL")  # fmt: skip
        # nothing is registered: a request fails at once with a clear error
        with pytest.raises(ModelNotFound):
            client.infer(vmodel_id="digits", inputs=[seed_tensor(seed_input)])

        report = sync_repository(registry_of(client), model_dir=str(repo))
        assert report.registered == ["digits@1"], report
        assert [v.active_model_id for v in client.list_vmodels()] == ["digits@1"]
        # the worker still holds the model: it announces its copy again, with no new load
        wait_for(lambda: copies_of(client, "digits@1") == {w.full_name: "LOADED"}, 30,
                 what="the worker to re-announce its copy")  # fmt: skip
        response = client.infer(vmodel_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)
        assert (response["model_name"], answer(response)) == ("digits@1", 8)
        assert w.tail(2000).count("loaded digits@1 (") == 1
    finally:
        client.close()
