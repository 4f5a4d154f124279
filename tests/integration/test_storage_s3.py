"""Models on S3 with real workers: boto3 -> HTTP -> moto's S3 server (no in-process patching).

The server enforces authentication (moto's IAM auth, switched on through its /moto-api), so
wrong credentials fail the way they fail against MinIO or AWS.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from mesh import InvalidArgument, MeshClient, ModelInfo, ModelLoadFailed, ModelState
from mesh.control.registry import MeshRegistry
from mesh.control.repository import sync_repository
from mesh.policy.repository import READY_MARKER
from mesh.settings import MeshSettings
from mesh.tools.launcher import free_port, wait_for

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str

    def client(self, key_id: str | None = None, secret: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key_id or self.key_id,
            aws_secret_access_key=secret or self.secret,
        )

    def storage_entry(self, bucket: str, **overrides: Any) -> dict:
        return {
            "type": "s3",
            "access_key_id": self.key_id,
            "secret_access_key": self.secret,
            "endpoint_url": self.endpoint,
            "bucket": bucket,
            "region": REGION,
            **overrides,
        }


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # the next 3 requests (creating an IAM user and its key) go unauthenticated; every
        # request after them must be signed with a key the server knows
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"3", timeout=10).raise_for_status()
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )  # fmt: skip
        iam.create_user(UserName="mesh")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="mesh", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="mesh")["AccessKey"]
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        # moto's auth switch is process-wide: leave it as it was
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        server.stop()


@pytest.fixture
def bucket(s3_server: S3Server, prefix: str) -> str:
    name = f"mesh-{prefix}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "disk-cache"


@pytest.fixture
def storage_env(s3_server: S3Server, bucket: str, cache_dir: Path) -> dict[str, str]:
    return {
        "MESH_STORAGE_CONFIG": json.dumps({"minio": s3_server.storage_entry(bucket)}),
        "MESH_DISK_CACHE_DIR": str(cache_dir),
    }


@pytest.fixture
def repo_client(redis_url: str, prefix: str, storage_env: dict, bucket: str) -> Iterator[MeshClient]:
    """A MeshClient whose settings name the S3 repository (what the beat scheduler would have)."""
    settings = MeshSettings(
        redis_url=redis_url,
        prefix=prefix,
        storage_config=storage_env["MESH_STORAGE_CONFIG"],
        model_dir=f"s3://{bucket}/repo",
    )
    with MeshClient(settings=settings) as c:
        yield c


def registry_of(c: MeshClient) -> MeshRegistry:
    """The registry a sync writes to, from a client's own parts (its caches see the changes)."""
    return MeshRegistry(c.app, c.store, vmodels=c.vmodels, router=c.router)


def seed_tensor(seed_input: list[float]) -> list[dict]:
    return [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}]


def answer(response: dict) -> int:
    return int(response["outputs"][0]["data"][0])


def upload_version(s3: Any, bucket: str, name: str, version: int, model: bytes, *, ready: bool = True, manifest: dict | None = None) -> None:
    base = f"repo/{name}/{version}/"
    s3.put_object(Bucket=bucket, Key=base + "model.joblib", Body=model)
    if manifest is not None:
        s3.put_object(Bucket=bucket, Key=base + "mesh.json", Body=json.dumps(manifest).encode())
    if ready:
        s3.put_object(Bucket=bucket, Key=base + READY_MARKER, Body=b"")


def cache_data_bytes(cache_dir: Path) -> int:
    """Model bytes in the disk cache: complete entries and downloads in progress.

    Read under the cache's global lock, as one moment: the worker keeps writing to the cache
    after a response (the model's reload snapshot, which may evict an entry first), and a walk
    that saw an entry before its eviction and the new file after it would count both.
    """
    import fcntl

    if not cache_dir.is_dir():  # the worker has not created it yet
        return 0
    lock = os.open(cache_dir / "cache.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _walk_data_bytes(cache_dir)
    finally:
        os.close(lock)


def _walk_data_bytes(cache_dir: Path) -> int:
    total = 0
    for sub in ("entries", "tmp"):
        for dirpath, _, filenames in os.walk(cache_dir / sub):  # tolerates directories vanishing
            for name in filenames:
                if name != "meta.json":
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:  # removed while we looked
                        pass
    return total


@dataclass
class Traffic:
    """One producer sending requests to a vmodel back to back, recording who answered."""

    client: MeshClient
    vmodel: str
    inputs: list[dict]
    answered_by: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                response = self.client.infer(vmodel_id=self.vmodel, inputs=self.inputs).get(timeout=60)
                assert answer(response) == 8, response
                self.answered_by.append(response["model_name"])
            except Exception as exc:  # every failure is a test failure, reported at the end
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def seen(self, model_id: str) -> bool:
        return model_id in self.answered_by[-50:]


def switched(client: MeshClient, vmodel_id: str, model_id: str) -> bool:
    """Whether the cutover is done, driving pending transitions as each beat tick does."""
    from mesh.control.vmodels import advance_all

    advance_all(client.store, client.app)
    return client.get_vmodel_status(vmodel_id).active_model_id == model_id


def test_repository_on_s3_versions_publish_rule_and_cutover_under_traffic(
    workers, s3_server, bucket, storage_env, repo_client, redis_url, prefix, svm_path, mlp_path, seed_input, cache_dir
):
    workers("w1", **storage_env)
    s3 = s3_server.client()
    upload_version(s3, bucket, "digits", 1, svm_path.read_bytes(), manifest={"batching": {"max_batch_size": 8}})

    report = sync_repository(registry_of(repo_client))
    assert report.ok, report
    assert report.registered == ["digits@1"] and report.vmodels_set == {"digits": "digits@1"}
    response = repo_client.infer(vmodel_id="digits", inputs=seed_tensor(seed_input)).get(timeout=60)
    assert (response["model_name"], answer(response)) == ("digits@1", 8)
    cfg = repo_client.get_effective_config("digits@1")
    assert (cfg.value("max_batch_size"), cfg.values["max_batch_size"].source) == (8, "manifest")
    # the version's files came through the disk cache and stay pinned while it is loaded
    assert any(p.name == "model.joblib" for p in (cache_dir / "entries").rglob("*"))

    with MeshClient(redis_url=redis_url, prefix=prefix) as producer:
        traffic = Traffic(producer, "digits", seed_tensor(seed_input))
        thread = threading.Thread(target=traffic.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: traffic.seen("digits@1"), timeout=60, what="traffic on digits@1")
            # v2 published; v3 half uploaded (its files, no marker yet)
            upload_version(s3, bucket, "digits", 2, mlp_path.read_bytes())
            upload_version(s3, bucket, "digits", 3, svm_path.read_bytes(), ready=False)
            report = sync_repository(registry_of(repo_client))
            assert report.registered == ["digits@2"], report
            assert report.vmodels_set == {"digits": "digits@2"}
            assert report.versions == {"digits": [1, 2]}
            wait_for(lambda: switched(repo_client, "digits", "digits@2"), timeout=120, what="the cutover to digits@2")
            wait_for(lambda: traffic.seen("digits@2"), timeout=60, what="traffic on digits@2")
            assert repo_client.get_model_status("digits@3").state is ModelState.NOT_FOUND
            assert sync_repository(registry_of(repo_client)).registered == []  # still unpublished

            s3.put_object(Bucket=bucket, Key=f"repo/digits/3/{READY_MARKER}", Body=b"")
            report = sync_repository(registry_of(repo_client))
            assert report.registered == ["digits@3"] and report.vmodels_set == {"digits": "digits@3"}
            wait_for(lambda: switched(repo_client, "digits", "digits@3"), timeout=120, what="the cutover to digits@3")
            wait_for(lambda: traffic.seen("digits@3"), timeout=60, what="traffic on digits@3")
        finally:
            traffic.stop.set()
            thread.join(timeout=90)
    assert not thread.is_alive()
    assert traffic.failures == []
    # each request went to one version, in publication order: no request flipped back
    order = [int(m.split("@")[1]) for m in traffic.answered_by]
    assert order == sorted(order) and set(order) == {1, 2, 3}
    # any version stays addressable directly
    response = repo_client.infer(model_id="digits@1", inputs=seed_tensor(seed_input)).get(timeout=60)
    assert response["model_name"] == "digits@1"

    # a removed version is unregistered once nothing references it
    for key in ("model.joblib", "mesh.json", READY_MARKER):
        s3.delete_object(Bucket=bucket, Key=f"repo/digits/1/{key}")
    report = sync_repository(registry_of(repo_client))
    assert report.unregistered == ["digits@1"]
    assert repo_client.get_model_status("digits@1").state is ModelState.NOT_FOUND


def test_disk_budget_holds_while_models_churn(workers, s3_server, bucket, storage_env, client, svm_path, seed_input, cache_dir):
    from workers.runtimes import get_runtime

    model = svm_path.read_bytes()
    in_memory = get_runtime("sklearn").load(svm_path, ModelInfo(runtime="sklearn", uri=f"file://{svm_path}")).size_bytes
    budget = int(len(model) * 2.5)  # room for two models on disk: one loaded, one loading
    workers(
        "w1", **storage_env,
        MESH_WORKER_CAPACITY_BYTES=int(in_memory * 1.5),  # one model in memory at a time
        MESH_DISK_CACHE_BYTES=budget,
    )  # fmt: skip
    s3 = s3_server.client()
    ids = [f"churn_{i}" for i in range(4)]
    for model_id in ids:
        s3.put_object(Bucket=bucket, Key=f"churn/{model_id}/model.joblib", Body=model)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"s3://{bucket}/churn/{model_id}/model.joblib"))

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache_data_bytes(cache_dir))
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(2):
            for model_id in ids:
                response = client.infer(model_id=model_id, inputs=seed_tensor(seed_input)).get(timeout=60)
                assert (response["model_name"], answer(response)) == (model_id, 8)
                assert cache_data_bytes(cache_dir) <= budget
    finally:
        stop.set()
        sampler.join(timeout=10)
    assert 0 < peak[0] <= budget
    entries = [p for p in (cache_dir / "entries").iterdir()]
    assert 1 <= len(entries) <= 2


def test_keys_and_paths_escaping_their_root_are_rejected(workers, s3_server, bucket, storage_env, repo_client, client, svm_path, seed_input, cache_dir, tmp_path):
    for info in (
        ModelInfo(runtime="sklearn", uri=f"s3://{bucket}/a/../../etc/passwd"),
        ModelInfo(runtime="sklearn", uri=f"s3://{bucket}//etc/passwd"),
        ModelInfo(runtime="sklearn", uri="/etc/passwd", storage_key="minio"),
        ModelInfo(runtime="sklearn", uri="../other-bucket/model.joblib", storage_key="minio"),
    ):
        with pytest.raises(InvalidArgument):
            client.register_model("escape", info)
    assert client.get_model_status("escape").state is ModelState.NOT_FOUND

    # S3 keys may hold '..': an object under a model's prefix that climbs out of it
    s3 = s3_server.client()
    model = svm_path.read_bytes()
    for base in ("evil/1/", "repo/evil/1/"):
        s3.put_object(Bucket=bucket, Key=base + "model.joblib", Body=model)
        s3.put_object(Bucket=bucket, Key=base + "../../../../outside.joblib", Body=model)
    s3.put_object(Bucket=bucket, Key="repo/evil/1/" + READY_MARKER, Body=b"")
    workers("w1", **storage_env)
    client.register_model("evil", ModelInfo(runtime="sklearn", uri=f"s3://{bucket}/evil/1/"))
    with pytest.raises(ModelLoadFailed, match="escapes"):
        client.infer(model_id="evil", inputs=seed_tensor(seed_input)).get(timeout=60)
    assert not list(tmp_path.rglob("outside.joblib"))

    # the repository does not publish a version holding such a key
    report = sync_repository(registry_of(repo_client))
    assert "escapes its root" in report.frozen["evil"]
    assert report.registered == [] and repo_client.get_model_status("evil@1").state is ModelState.NOT_FOUND


def test_wrong_credentials_or_an_unreachable_endpoint_fail_the_load_clearly(workers, s3_server, bucket, client, svm_path, seed_input, cache_dir):
    wrong_secret = "this-is-not-the-secret-0123456789"
    config = {
        "wrong": s3_server.storage_entry(bucket, secret_access_key=wrong_secret),
        "unknown": s3_server.storage_entry(bucket, access_key_id="AKIANOSUCHKEY0000000"),
        "down": s3_server.storage_entry(bucket, endpoint_url=f"http://127.0.0.1:{free_port()}"),
    }
    w = workers("w1", MESH_STORAGE_CONFIG=json.dumps(config), MESH_DISK_CACHE_DIR=str(cache_dir))
    s3_server.client().put_object(Bucket=bucket, Key="m/model.joblib", Body=svm_path.read_bytes())
    expected = {
        "wrong": "access denied (SignatureDoesNotMatch)",
        "unknown": "access denied (InvalidAccessKeyId)",
        "down": "endpoint unreachable",
    }
    for key, message in expected.items():
        model_id = f"creds_{key}"
        client.register_model(
            model_id, ModelInfo(runtime="sklearn", uri=f"s3://{bucket}/m/model.joblib", storage_key=key)
        )
        with pytest.raises(ModelLoadFailed) as err:
            client.infer(model_id=model_id, inputs=seed_tensor(seed_input)).get(timeout=60)
        assert message in str(err.value), str(err.value)
        assert f"storage key {key!r}" in str(err.value)
        status = client.get_model_status(model_id)
        assert status.state is ModelState.LOADING_FAILED
        assert message in status.errors[0]
    log = w.tail(5000)
    assert s3_server.secret not in log and wrong_secret not in log


def test_stateless_boot_from_the_repository_with_no_api_call(
    workers, s3_server, bucket, storage_env, mesh_env, client, svm_path, seed_input, tmp_path
):
    """Workers and beat started with MESH_MODEL_DIR: the mesh serves the repository's models
    with no management call (the sync runs when beat starts, then every interval)."""
    from mesh.tools.launcher import start_beat

    s3 = s3_server.client()
    upload_version(s3, bucket, "digits", 1, svm_path.read_bytes())
    upload_version(s3, bucket, "digits", 2, svm_path.read_bytes())
    workers("w1", **storage_env, MESH_MODEL_DIR=f"s3://{bucket}/repo")  # the repository is the workers'
    beat = start_beat(
        {**mesh_env, "MESH_MODEL_DIR": f"s3://{bucket}/repo", "MESH_REPOSITORY_SYNC_INTERVAL_S": "2"},
        tmp_path / "logs",
    )
    try:
        vmodels = wait_for(client.list_vmodels, timeout=60, what="the first repository sync")
        assert [(v.vmodel_id, v.active_model_id) for v in vmodels] == [("digits", "digits@2")]
        response = client.infer(vmodel_id="digits", inputs=seed_tensor(seed_input)).get(timeout=60)
        assert (response["model_name"], answer(response)) == ("digits@2", 8)
        assert {r.model_id for r in client.list_models()} == {"digits@1", "digits@2"}
        # a version published later is picked up by the periodic sync
        upload_version(s3, bucket, "digits", 3, svm_path.read_bytes())
        wait_for(
            lambda: client.get_model_status("digits@3").state is not ModelState.NOT_FOUND,
            timeout=60, what="the periodic sync to register digits@3",
        )  # fmt: skip
    except BaseException:
        print(f"----- beat log tail -----\n{beat.tail(80)}")
        raise
    finally:
        beat.stop()
