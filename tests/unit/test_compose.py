"""docker-compose.yml: valid for `docker compose config`, shaped as documented, and its init
step (scripts/publish_example_model.py) publishes a servable model into an S3 repository.

No Docker engine runs here, so the containers themselves are not started: the file is
validated by the real compose CLI, every mesh service's environment is parsed by the
settings the processes would use, and the init script runs against moto's S3 server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.control.repository import open_repository, scan
from mesh.settings import MeshSettings
from mesh.storage.sources import load_storage_config
from mesh.tools.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
MESH_SERVICES = ("models-init", "worker", "beat", "flower", "exporter", "gateway")


# what an operator puts in the environment or .env: the file ships no password
SECRETS = {"REDIS_PASSWORD": "redis-pw-0123", "MINIO_ROOT_USER": "mesh-minio",
           "MINIO_ROOT_PASSWORD": "minio-pw-4567", "FLOWER_BASIC_AUTH": "admin:flower-pw-89"}  # fmt: skip


def compose(*args: str, secrets: dict[str, str] = SECRETS) -> subprocess.CompletedProcess:
    docker = shutil.which("docker")
    if docker is None:
        pytest.fail("the docker CLI is not installed: docker-compose.yml cannot be validated")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.fail(
            "`docker compose version` failed: the compose CLI plugin is missing; "
            f"run scripts/ensure-test-tools ({version.stderr.strip()[:200]})"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "REDIS_", "MINIO_", "FLOWER_"))}
    env.update(secrets)
    return subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


@pytest.fixture(scope="module")
def config() -> dict:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_docker_compose_config_passes():
    proc = compose("config", "--quiet")
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_the_stack_refuses_to_start_without_each_password(missing):
    proc = compose("config", "--quiet", secrets={k: v for k, v in SECRETS.items() if k != missing})
    assert proc.returncode != 0 and missing in proc.stderr, proc.stderr


def test_the_stack_is_what_the_docs_say(config):
    services = config["services"]
    assert set(services) >= {"redis", "minio", "models-init", "worker", "beat", "flower", "gateway"}
    assert services["gateway"]["command"] == ["mesh", "gateway"]
    assert {p["published"] for p in services["gateway"]["ports"]} == {"8033", "8008"}

    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    assert services["worker"]["deploy"]["replicas"] == 2
    flower_env = services["flower"]["environment"]
    assert ":" in flower_env["FLOWER_BASIC_AUTH"] and "FLOWER_UNAUTHENTICATED_API" not in flower_env
    assert all(p.get("host_ip") == "127.0.0.1" for s in services.values() for p in s.get("ports", []))

    init = services["models-init"]["command"]
    assert init[:2] == ["python", "scripts/publish_example_model.py"] and (ROOT / init[1]).is_file()
    assert services["beat"]["depends_on"]["models-init"]["condition"] == "service_completed_successfully"

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "pip install" in dockerfile

    # every mesh process would start with these settings: same Redis and prefix, a storage
    # config whose bucket holds the repository
    for name in MESH_SERVICES:
        env = services[name]["environment"]
        settings = MeshSettings(**{k[len("MESH_"):].lower(): v for k, v in env.items() if k.startswith("MESH_")})
        assert settings.redis_url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        storage = load_storage_config(settings.storage_config)
        entry = storage.root[settings.model_dir_storage_key]
        assert settings.model_dir == f"s3://{entry.bucket}/repo"
        assert entry.endpoint_url == "http://minio:9000"
    assert services["worker"]["environment"]["MESH_METRICS_PORT"] == "9101"
    assert services["worker"]["environment"]["MESH_METRICS_ADDR"] == "0.0.0.0"  # in its container
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    # the mesh's signals, bound inside its container, published on the host's loopback
    exporter = services["exporter"]
    assert exporter["command"] == ["mesh", "exporter"] and exporter["environment"]["MESH_EXPORTER_ADDR"] == "0.0.0.0"
    assert [(p["published"], p["target"]) for p in exporter["ports"]] == [("9808", 9808)]
    # the sentinel profile's services only with the profile
    assert not {"redis-replica", "sentinel-1"} & set(services)


SENTINEL_URL = "sentinel://:{pw}@sentinel-1:26379/0;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379"


def test_the_sentinel_profile_adds_a_replica_and_three_sentinels_the_mesh_reaches_redis_through():
    from mesh.broker.celery_options import mesh_celery_settings
    from mesh.broker.redis_url import parse_sentinel_url

    url = SENTINEL_URL.format(pw=SECRETS["REDIS_PASSWORD"])
    proc = compose("--profile", "sentinel", "config", "--format", "json",
                   secrets={**SECRETS, "MESH_REDIS_URL": url, "MESH_SENTINEL_MASTER": "mesh"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and f"--masterauth {SECRETS['REDIS_PASSWORD']}" in replica
    assert "--maxmemory-policy noeviction" in replica
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][0]
        assert "sentinel monitor mesh redis 6379 2" in script and "--sentinel" in script
        assert f"sentinel auth-pass mesh {SECRETS['REDIS_PASSWORD']}" in script
        assert not services[name].get("ports")  # reachable inside the stack's network only
    for name in MESH_SERVICES:
        env = services[name]["environment"]
        settings = MeshSettings(**{k[len("MESH_"):].lower(): v for k, v in env.items() if k.startswith("MESH_")})
        assert settings.redis_url == url and settings.sentinel_master == "mesh"
        assert [h for h, _ in parse_sentinel_url(url).sentinels] == ["sentinel-1", "sentinel-2", "sentinel-3"]
        conf = mesh_celery_settings(settings)
        assert conf["broker_transport_options"]["master_name"] == "mesh"


def test_init_step_publishes_a_servable_model(config, tmp_path):
    import boto3
    import joblib
    from moto.server import ThreadedMotoServer

    from mesh.tools.examples import SEED_DIGITS_INPUT

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = dict(config["services"]["models-init"]["environment"])
        storage = json.loads(env["MESH_STORAGE_CONFIG"])
        storage["minio"]["endpoint_url"] = f"http://127.0.0.1:{port}"  # moto stands in for MinIO
        env["MESH_STORAGE_CONFIG"] = json.dumps(storage)
        command = config["services"]["models-init"]["command"]
        run_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")}, **env}

        def publish() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=run_env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip

        first = publish()
        assert first.returncode == 0, first.stderr
        assert "published s3://models/repo/mnist-svm/1/model.joblib" in first.stdout
        again = publish()
        assert again.returncode == 0 and "already published" in again.stdout, again.stderr

        # the repository sync sees exactly one published version
        settings = MeshSettings(storage_config=env["MESH_STORAGE_CONFIG"], model_dir_storage_key="minio")
        repo = open_repository(env["MESH_MODEL_DIR"], settings)
        scanned = scan(repo.list_files())
        version = scanned.names["mnist-svm"].versions[1]
        assert version.published and [f.relpath for f in version.files] == ["mnist-svm/1/model.joblib"]

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id=SECRETS["MINIO_ROOT_USER"],
                          aws_secret_access_key=SECRETS["MINIO_ROOT_PASSWORD"])  # fmt: skip
        body = s3.get_object(Bucket="models", Key="repo/mnist-svm/1/model.joblib")["Body"].read()
        model = joblib.load(io.BytesIO(body))  # our own upload, from the server this test started
        assert model.predict([SEED_DIGITS_INPUT])[0] == 8
    finally:
        server.stop()
