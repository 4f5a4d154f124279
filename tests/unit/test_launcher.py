"""mesh.tools.launcher: Proc lifecycle by pid / process group, commands, wait helpers."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import redis

from mesh.tools.embedded import _pid_alive
from mesh.tools.launcher import (
    REPO_ROOT,
    Proc,
    _child_env,
    wait_for,
    wait_worker_ready,
    worker_command,
    worker_full_name,
    worker_heartbeat_key,
)


def _py(tmp_path: Path, code: str, name: str = "child") -> Proc:
    return Proc(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def _log_has(proc: Proc, text: str) -> bool:
    return text in proc.tail(1000)


def test_proc_stop_by_pid(tmp_path: Path) -> None:
    proc = _py(tmp_path, "import time; print('up', flush=True); time.sleep(120)")
    try:
        assert proc.alive() and proc.pid > 0
        wait_for(lambda: _log_has(proc, "up"), 20, what="child output")
        t0 = time.monotonic()
        code = proc.stop()
        assert time.monotonic() - t0 < 5
        assert code == -signal.SIGTERM
        assert not proc.alive()
        assert not _pid_alive(proc.pid)
        assert proc.stop() == code  # idempotent
    finally:
        proc.kill()


def test_proc_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(120)"
    )
    proc = _py(tmp_path, code)
    try:
        wait_for(lambda: _log_has(proc, "ignoring"), 20, what="child ready")
        t0 = time.monotonic()
        assert proc.stop(timeout=0.5) == -signal.SIGKILL
        assert 0.4 < time.monotonic() - t0 < 5
        assert not _pid_alive(proc.pid)
    finally:
        proc.kill()


def test_proc_stop_sweeps_process_group(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('grandchild', p.pid, flush=True); time.sleep(120)"
    )
    proc = _py(tmp_path, code)
    try:
        line = wait_for(
            lambda: next((l for l in proc.tail().splitlines() if l.startswith("grandchild")), None),
            20, what="grandchild pid",
        )  # fmt: skip
        grandchild = int(line.split()[1])
        assert _pid_alive(grandchild)
        proc.stop()
        wait_for(lambda: not _pid_alive(grandchild), 10, what="grandchild gone")
    finally:
        proc.kill()


def test_proc_kill(tmp_path: Path) -> None:
    proc = _py(tmp_path, "import time; time.sleep(120)")
    assert proc.kill() == -signal.SIGKILL
    assert not proc.alive()
    assert not _pid_alive(proc.pid)


def test_proc_alive_false_after_exit_and_tail(tmp_path: Path) -> None:
    proc = _py(tmp_path, "import sys\nfor i in range(200): print('line', i)\nsys.exit(3)")
    wait_for(lambda: not proc.alive(), 20, what="child exit")
    assert proc.returncode is None  # alive() does not reap
    assert proc.wait(timeout=5) == 3
    tail = proc.tail(5).splitlines()
    assert tail == [f"line {i}" for i in range(195, 200)]
    assert proc.stop() == 3


def test_proc_log_appends_stderr(tmp_path: Path) -> None:
    proc = _py(tmp_path, "import sys; print('out'); print('err', file=sys.stderr)")
    assert proc.wait(timeout=20) == 0
    assert "out" in proc.tail() and "err" in proc.tail()
    assert proc.log_path == tmp_path / "child.log"


def test_wait_for_returns_value() -> None:
    calls = []

    def pred() -> int | None:
        calls.append(1)
        return 42 if len(calls) >= 3 else None

    assert wait_for(pred, 5, interval=0.01) == 42
    assert len(calls) == 3


def test_wait_for_timeout_message() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon to turn blue"):
        wait_for(lambda: False, 0.3, what="the moon to turn blue")
    assert 0.25 < time.monotonic() - t0 < 2


def test_worker_command_and_names() -> None:
    cmd = worker_command("w1")
    assert cmd == [
        sys.executable, "-m", "celery", "-A", "mesh.app", "worker", "-P", "solo",
        "-n", "w1@%h", "-E", "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]  # fmt: skip
    assert worker_command("w1", loglevel="DEBUG")[-1] == "DEBUG"
    from celery.utils.nodenames import host_format

    assert worker_full_name("w1") == host_format("w1@%h")
    assert worker_heartbeat_key("t1", "w1@h") == "t1:worker:w1@h"


def test_child_env() -> None:
    env = _child_env({"MESH_PREFIX": "p", "N": 3}, EXTRA="x")
    assert env["MESH_PREFIX"] == "p" and env["N"] == "3" and env["EXTRA"] == "x"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert "PATH" in env  # merged over os.environ


def _state_json(name: str) -> str:
    from mesh.models import WorkerState

    now = time.time()
    return WorkerState(
        name=name, host="h", pid=1, capacity_bytes=10, used_bytes=0, started_at=now, updated_at=now
    ).model_dump_json()


def test_wait_worker_ready_reads_heartbeat(redis_url: str, prefix: str) -> None:
    c = redis.Redis.from_url(redis_url)
    c.set(worker_heartbeat_key(prefix, "w1@h"), _state_json("w1@h"), ex=30)
    c.close()
    state = wait_worker_ready(redis_url, prefix, "w1@h", timeout=5)
    assert state.name == "w1@h"
    with pytest.raises(TimeoutError, match="w2@h"):
        wait_worker_ready(redis_url, prefix, "w2@h", timeout=0.3)


def test_wait_worker_ready_fails_fast_when_proc_dies(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    proc = _py(tmp_path, "import sys; print('boom: bad config'); sys.exit(2)")
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="boom: bad config"):
            wait_worker_ready(redis_url, prefix, "w9@h", timeout=60, proc=proc)
        assert time.monotonic() - t0 < 20
    finally:
        proc.stop()
