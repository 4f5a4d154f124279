"""The mesh's cluster-level signals endpoint (`mesh exporter`, docs/operations.md "Autoscaling
signals"), a real process scraped over HTTP while a backlog builds with no worker consuming,
then drains once one worker starts: pending and the age of the oldest pending request rise,
then fall to zero. Per-model series stay within the top N. A model of a pool no worker joins
(it requires a label the worker lacks) stays pending there: its pool's series say so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from mesh.tools.launcher import free_port, wait_for
from tests.faults.helpers import X, slow_info

TOP_N = 2


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "mesh"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def scraped_if(port: int, condition) -> dict | None:
    m = scrape(port)
    return m if condition(m) else None


def cluster(m: dict, name: str) -> float:
    return m[(f"mesh_cluster_{name}", ())]


def per_model(m: dict, name: str) -> dict[str, float]:
    return {dict(labels)["model"]: v for (n, labels), v in m.items() if n == f"mesh_model_{name}"}


def per_pool(m: dict, name: str) -> dict[str, float]:
    return {dict(labels)["pool"]: v for (n, labels), v in m.items() if n == f"mesh_pool_{name}"}


def test_exporter_follows_a_backlog_building_then_draining(client, workers, mesh_env, tmp_path: Path):
    port = free_port()
    env = {**os.environ, **mesh_env, "MESH_SIGNALS_MIN_INTERVAL_S": "0", "MESH_SIGNALS_TOP_N": str(TOP_N)}
    log = open(tmp_path / "exporter.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mesh.tools.cli", "exporter", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: _answers(port), 60, interval=0.2, what="the exporter to serve")
        sizes = {"a": 3_000_000, "b": 2_000_000, "c": 1_000_000}
        for model_id, size in sizes.items():
            client.register_model(model_id, slow_info(tmp_path, model_id, size=size, delay=0.002))
        gpu = slow_info(tmp_path, "g", size=500_000).model_copy(update={"required_labels": {"env": "gpu"}})
        client.register_model("g", gpu)
        # no worker: everything sent waits in Redis (a: 6, b: 4, c: 2, g: 1)
        handles = [client.infer(model_id=m, inputs=[X]) for m, n in (("a", 6), ("b", 4), ("c", 2)) for _ in range(n)]
        client.infer(model_id="g", inputs=[X])  # never answered here: no worker carries env=gpu

        first = wait_for(lambda: scraped_if(port, lambda m: cluster(m, "pending_requests") == 13), 30,
                         what="the backlog in the signals")  # fmt: skip
        assert cluster(first, "queued_requests") == 13 and cluster(first, "workers") == 0
        assert cluster(first, "models_pending") == 4 and cluster(first, "models_pending_without_copy") == 4
        assert cluster(first, "demand_bytes") == sum(sizes.values()) + 500_000 and cluster(first, "capacity_bytes") == 0
        # the top N models by pending only; the rest in the aggregate
        assert per_model(first, "pending_requests") == {"a": 6, "b": 4}
        assert cluster(first, "other_pending_requests") == 3
        # per pool: the models that require no label, and env=gpu's
        assert per_pool(first, "pending_requests") == {"default": 12, "env=gpu": 1}
        assert per_pool(first, "demand_bytes") == {"default": sum(sizes.values()), "env=gpu": 500_000}
        assert per_pool(first, "capacity_bytes") == {"default": 0, "env=gpu": 0}
        age = cluster(first, "oldest_pending_age_seconds")
        assert age >= 0
        # nothing consumes: the oldest request keeps getting older
        wait_for(lambda: cluster(scrape(port), "oldest_pending_age_seconds") > age + 0.5, 30,
                 what="the age of the oldest pending request to rise")  # fmt: skip

        w = workers("w1", MESH_WORKER_CAPACITY_BYTES=str(100_000_000))
        for h in handles:
            assert h.get(timeout=120)["outputs"][0]["data"] == [10.0]
        drained = wait_for(lambda: scraped_if(port, lambda m: per_pool(m, "pending_requests").get("default") == 0
                                              and cluster(m, "copies_loaded") == 3), 60,
                           what="the backlog to drain and the copies to show")  # fmt: skip
        assert per_model(drained, "pending_requests") == {"g": 1}
        assert cluster(drained, "workers") == 1 and cluster(drained, "capacity_bytes") == 100_000_000
        assert cluster(drained, "demand_bytes") == sum(sizes.values()) + 500_000  # loaded or pending: wanted
        # the worker serves the default pool; env=gpu has none: demand, pending, no capacity
        assert per_pool(drained, "capacity_bytes") == {"default": 100_000_000, "env=gpu": 0}
        assert per_pool(drained, "workers") == {"default": 1, "env=gpu": 0}
        assert per_pool(drained, "models_pending_without_copy") == {"default": 0, "env=gpu": 1}
        assert per_pool(drained, "models_loaded") == {"default": 3, "env=gpu": 0}
        assert w.alive()
        assert drained[("mesh_signals_up", ())] == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode in (0, -15), (tmp_path / "exporter.log").read_text()[-2000:]


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except requests.RequestException:
        return False
