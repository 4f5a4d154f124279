"""UTF-8 ids end to end (issue 23): ids with non-ASCII text, emoji, spaces, `:`, `*`, `/`,
`?` and `%` through MeshClient (register, infer, vmodels, status, unregister), a plain Celery
producer's `send_task` with the `mm-model-id` header, the CLI, Celery's events (what Flower
shows) and the worker's Prometheus labels: real workers on a real Redis. Keys and queues hold
only the encoded form; people see the original id."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from mesh import ModelNotFound, ModelState
from mesh.protocol.ids import encode_id
from mesh.tools.launcher import REPO_ROOT, free_port, wait_for

from .test_foundation import answer, seed_tensor, sklearn_info

IDS = ["modèle", "模型", "🤖 bot", "a b:c*d/e?f%g"]
VMODEL = "vmodèle 虚拟/?*%"
MESH = Path(sys.executable).parent / "mesh"


def labels_of(port: int, metric: str) -> set[str]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == metric and "model" in s.labels}  # fmt: skip


def copy_model(svm_path: Path, tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"model{n}.joblib"  # file names stay plain: the id is not a path
    shutil.copy(svm_path, path)
    return path


def test_utf8_ids_through_meshclient_vmodels_status_cli_events_and_metrics(
    client, workers, svm_path, seed_input, tmp_path, redis_url, prefix
):
    port = free_port()
    workers("w1", MESH_METRICS_PORT=port)
    events: list[dict] = []
    ready, stop = threading.Event(), threading.Event()

    def listen() -> None:  # Celery's event receiver: what Flower shows
        with client.app.connection_for_read() as conn:
            recv = client.app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set():
                    return

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    with client.app.events.default_dispatcher() as probe:
        wait_for(lambda: probe.send("mesh-probe") or any(e["type"] == "mesh-probe" for e in events),
                 10, interval=0.1, what="the event receiver to listen")  # fmt: skip

    for n, model_id in enumerate(IDS):
        client.register_model(model_id, sklearn_info(copy_model(svm_path, tmp_path, n)))
    assert {m.model_id for m in client.list_models()} == set(IDS)
    results = {model_id: client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]) for model_id in IDS}
    for model_id, r in results.items():
        response = r.get(timeout=90)
        assert response["model_name"] == model_id and answer(response) == 8
        status = client.get_model_status(model_id)
        assert status.state is ModelState.LOADED and status.model_id == model_id

    # Redis holds the encoded form only: the queue, the copies, and no raw id in any key name
    r = client.store.r
    names = {k.decode("utf-8") for k in r.scan_iter(match=f"{prefix}*", count=1000)}
    for model_id in IDS:
        assert f"{prefix}:copies:{encode_id(model_id)}" in names
        assert not any(model_id in name for name in names), model_id
    assert all(re.fullmatch(r"[\x20-\x7e]+", name) for name in names), "a key name is not printable ASCII"
    # the worker's heartbeat lists the original ids
    wait_for(lambda: {m.model_id for m in client.list_workers()[0].models} == set(IDS), timeout=30,
             what="a heartbeat listing the four ids")  # fmt: skip

    # vmodels: a UTF-8 vmodel over a UTF-8 target, moved to another, then deleted
    client.set_vmodel(VMODEL, IDS[1], sync=True, timeout=120)
    response = client.infer(vmodel_id=VMODEL, inputs=[seed_tensor(seed_input)]).get(timeout=60)
    assert response["model_name"] == IDS[1] and answer(response) == 8
    vst = client.set_vmodel(VMODEL, IDS[0], sync=True, timeout=120)
    assert vst.active_model_id == IDS[0]
    assert client.get_vmodel_status(VMODEL).active_model_id == IDS[0]
    assert [v.vmodel_id for v in client.list_vmodels()] == [VMODEL]
    assert client.infer(vmodel_id=VMODEL, inputs=[seed_tensor(seed_input)]).get(timeout=60)["model_name"] == IDS[0]

    # the CLI shows the original ids
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
           "MESH_REDIS_URL": redis_url, "MESH_PREFIX": prefix, "COLUMNS": "250", "NO_COLOR": "1",
           "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "utf-8"}  # fmt: skip

    def mesh(*args: str) -> str:
        out = subprocess.run([str(MESH), *args], env=env, capture_output=True, text=True, encoding="utf-8",
                             timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    listing = mesh("models", "list")
    for model_id in IDS:
        assert model_id in listing
    assert IDS[3] in mesh("models", "status", IDS[3])
    assert VMODEL in mesh("vmodels", "status", VMODEL)
    assert IDS[1] in mesh("status")

    # Prometheus labels carry the original ids; task events name them (mesh.infer[<id>])
    assert set(IDS) <= wait_for(lambda: (got := labels_of(port, "mesh_requests_total")) >= set(IDS) and got,
                                timeout=30, what="request series of every id")  # fmt: skip
    sent = {r.id: model_id for model_id, r in results.items()}
    received = wait_for(lambda: (got := {e["uuid"]: e for e in events if e["type"] == "task-received"
                                         and e.get("uuid") in sent}) and len(got) == len(sent) and got,
                        timeout=30, what="task-received events of every request")  # fmt: skip
    stop.set()
    for task_id, e in received.items():
        assert e["name"] == f"mesh.infer[{sent[task_id]}]" and e["model"] == sent[task_id]

    # unregister: gone from the listing and from Redis' per-model keys
    client.delete_vmodel(VMODEL)
    for model_id in IDS:
        client.unregister_model(model_id)
        assert client.get_model_status(model_id).state is ModelState.NOT_FOUND
        with pytest.raises(ModelNotFound):
            client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)])
    assert client.list_models() == []


def test_utf8_ids_through_a_plain_celery_producer(client, workers, mesh_env, svm_path, seed_input, tmp_path):
    """A producer that knows only Celery: `send_task("mesh.infer")` with the `mm-model-id` /
    `mm-vmodel-id` header holding the UTF-8 id as it is, and `AsyncResult(id).get()`."""
    workers("w1")
    for n, model_id in enumerate(IDS):
        client.register_model(model_id, sklearn_info(copy_model(svm_path, tmp_path, n)))
    client.set_vmodel(VMODEL, IDS[2])
    script = f"""
import json, sys
from mesh.app import app
from mesh.errors import ModelNotFound
from celery.result import AsyncResult
inputs = [{json.dumps(seed_tensor(seed_input))}]
ids = json.loads(sys.argv[1])
sent = [(m, app.send_task("mesh.infer", kwargs={{"inputs": inputs}}, headers={{"mm-model-id": m}}).id) for m in ids]
sent.append(("vmodel", app.send_task("mesh.infer", kwargs={{"inputs": inputs}},
                                     headers={{"mm-vmodel-id": {json.dumps(VMODEL)}}}).id))
for m, task_id in sent:
    print(json.dumps({{"sent": m, "response": AsyncResult(task_id, app=app).get(timeout=90)}}, ensure_ascii=False))
try:
    app.send_task("mesh.infer", kwargs={{"inputs": inputs}}, headers={{"mm-model-id": "模型 missing"}})
except ModelNotFound as e:
    print(json.dumps({{"not_found": str(e)}}, ensure_ascii=False))
"""
    env = {**os.environ, **mesh_env, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(IDS)], env=env, capture_output=True,
                         text=True, encoding="utf-8", timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(lines) == len(IDS) + 2
    for line, model_id in zip(lines, [*IDS, IDS[2]]):
        assert line["response"]["model_name"] == model_id and answer(line["response"]) == 8
    assert "模型 missing" in lines[-1]["not_found"]
