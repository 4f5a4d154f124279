"""Starting and stopping the stack's processes: Celery workers, beat and Flower.

Used by the tests, the demo and `mesh up`. Every process is started in its own process group
with stdout and stderr appended to a log file, and is stopped by its pid / process group, never
by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mesh.protocol.keys import Keys

if TYPE_CHECKING:
    from mesh.models import WorkerState

__all__ = [
    "Proc",
    "REPO_ROOT",
    "start_beat",
    "start_flower",
    "start_gateway",
    "wait_gateway_ready",
    "wait_flower_ready",
    "start_worker",
    "wait_for",
    "wait_worker_ready",
    "worker_command",
    "worker_full_name",
    "worker_heartbeat_key",
]

T = TypeVar("T")

#: The checkout this module lives in; put on the children's PYTHONPATH so that `mesh.app` and
#: `celeryconfig` import even when the project is not pip-installed and the cwd is elsewhere.
REPO_ROOT = Path(__file__).resolve().parents[2]

_HAS_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


class Proc:
    """A child process in its own process group, output appended to `log_path`.

    The leader is only reaped by :meth:`stop`, :meth:`kill` or :meth:`wait`, after the rest of
    its process group has been swept: while unreaped its pid (= the group id) cannot be reused,
    so signalling the group can never hit an unrelated process.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = Path(log_path)
        self.full_name: str | None = None  # Celery node name, set for workers
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=str(cwd) if cwd is not None else None,
                start_new_session=True,  # own session => own process group, pgid == pid
            )
        self.pid: int = self.popen.pid
        self.pgid: int = self.pid

    # --- state
    def _exited(self) -> bool:
        """Has the leader exited? Does not reap it (WNOWAIT)."""
        if self.popen.returncode is not None:
            return True
        if _HAS_WAITID:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere
                self.popen.poll()
                return True
            return info is not None and info.si_pid == self.pid
        return self.popen.poll() is not None  # pragma: no cover - non-Linux fallback

    def alive(self) -> bool:
        return not self._exited()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    # --- stopping
    def _signal_group(self, sig: int) -> None:
        if self.popen.returncode is not None:
            return  # leader reaped: the group id is no longer ours to signal
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _reap(self) -> int | None:
        # Sweep whatever is left of the group (children of the leader), then reap the leader.
        self._signal_group(signal.SIGKILL)
        try:
            return self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a D-state process
            return None

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM the process group, wait up to `timeout`, then SIGKILL the group. Returns the exit code."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        if not self._exited():
            self._signal_group(signal.SIGTERM)
            self._wait_exit(timeout)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the process group at once (fault injection) and reap the leader."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        return self._reap()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the leader to exit by itself (no signal), then sweep the group and reap it."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        if not self._wait_exit(float("inf") if timeout is None else timeout):
            raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout}s")
        return self._reap()

    # --- logs
    def tail(self, n: int = 80) -> str:
        """The last `n` lines of the log (reads at most the last 1 MiB)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 1024 * 1024))
                data = f.read()
        except OSError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exited({self.popen.returncode})"
        return f"Proc(name={self.name!r}, pid={self.pid}, {state}, log={str(self.log_path)!r})"

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- commands


def worker_command(name: str, queues_hint: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The argv of a Mesh worker named ``{name}@%h``.

    `queues_hint` is accepted for future use and currently ignored: Mesh workers pick their
    queues themselves (per-model queues are added and cancelled at run time).
    """
    del queues_hint
    return [
        sys.executable, "-m", "celery", "-A", "mesh.app", "worker",
        "-P", "solo",
        "-n", f"{name}@%h",
        "-E",
        "--without-mingle", "--without-gossip",
        "--loglevel", loglevel,
    ]  # fmt: skip


def worker_full_name(name: str) -> str:
    """The Celery node name `-n {name}@%h` expands to.

    Celery's ``%h`` is ``celery.utils.nodenames.gethostname()``, a memoized
    ``socket.gethostname()`` (the full hostname, dots included).
    """
    return f"{name}@{socket.gethostname()}"


def worker_heartbeat_key(prefix: str, worker_name: str) -> str:
    """Redis key of a worker's JSON `WorkerState` heartbeat (`worker_name` is the full name)."""
    return Keys(prefix).worker(worker_name)


def _child_env(env: Mapping[str, Any] | None, **extra: str) -> dict[str, str]:
    merged = dict(os.environ)
    if env:
        merged.update({k: str(v) for k, v in env.items()})
    merged.update(extra)
    merged["PYTHONUNBUFFERED"] = "1"
    pythonpath = merged.get("PYTHONPATH", "")
    parts = [p for p in pythonpath.split(os.pathsep) if p]
    if str(REPO_ROOT) not in parts:
        merged["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *parts])
    return merged


def start_worker(
    name: str, env: Mapping[str, Any] | None, log_dir: Path, loglevel: str = "INFO"
) -> Proc:
    """Start `celery -A mesh.app worker` as `{name}@<hostname>`; log in `log_dir/worker-{name}.log`.

    The returned Proc has `full_name` set. Use `wait_worker_ready` to wait for its heartbeat.
    """
    proc = Proc(
        f"worker-{name}",
        worker_command(name, loglevel=loglevel),
        Path(log_dir) / f"worker-{name}.log",
        env=_child_env(env),
        cwd=REPO_ROOT,
    )
    proc.full_name = worker_full_name(name)
    return proc


def start_beat(env: Mapping[str, Any] | None, log_dir: Path) -> Proc:
    """Start `celery -A mesh.app beat` with its schedule file in `log_dir`."""
    log_dir = Path(log_dir)
    return Proc(
        "beat",
        [
            sys.executable, "-m", "celery", "-A", "mesh.app", "beat",
            "--loglevel", "INFO",
            "-s", str(log_dir / "beat-schedule"),
        ],  # fmt: skip
        log_dir / "beat.log",
        env=_child_env(env),
        cwd=REPO_ROOT,
    )


def start_flower(env: Mapping[str, Any] | None, log_dir: Path, port: int, basic_auth: str | None = None) -> Proc:
    """Start Flower on 127.0.0.1:`port`.

    With `basic_auth` ("user:password", given through the environment, never the command line)
    Flower asks for that login and refuses cross-site requests (flower/views/__init__.py
    `check_xsrf_cookie`): what `mesh up` runs. Without it, the HTTP API is open
    (FLOWER_UNAUTHENTICATED_API) and, as Flower then skips its cross-site check, any web page the
    machine's browser opens could send tasks through it: for tests and scripts only.
    """
    log_dir = Path(log_dir)
    auth = {"FLOWER_BASIC_AUTH": basic_auth} if basic_auth else {"FLOWER_UNAUTHENTICATED_API": "true"}
    return Proc(
        "flower",
        [
            sys.executable, "-m", "celery", "-A", "mesh.app", "flower",
            f"--port={port}", "--address=127.0.0.1",
        ],  # fmt: skip
        log_dir / "flower.log",
        env=_child_env(env, **auth),
        cwd=REPO_ROOT,
    )


def gateway_command() -> list[str]:
    return [sys.executable, "-m", "mesh.tools.cli", "gateway"]


def start_gateway(env: Mapping[str, Any] | None, log_dir: Path) -> Proc:
    """Start `mesh gateway` (ports and host from MESH_GATEWAY_* in `env`); `wait_gateway_ready`
    returns the ports it bound."""
    log_dir = Path(log_dir)
    return Proc("gateway", gateway_command(), log_dir / "gateway.log", env=_child_env(env), cwd=REPO_ROOT)


def wait_gateway_ready(proc: Proc, timeout: float = 60) -> dict[str, int]:
    """The ports of a started gateway, from its ready line ({"grpc": port, "http": port})."""
    from mesh.gateway.server import READY_LINE

    def bound() -> dict[str, int] | None:
        if not proc.alive():
            raise RuntimeError(f"the gateway exited before listening:\n{proc.tail()}")
        for line in proc.tail(200).splitlines():
            if line.startswith(READY_LINE):
                ports = dict(part.split("=", 1) for part in line[len(READY_LINE):].split())
                return {k: int(v.rsplit(":", 1)[1]) for k, v in ports.items()}
        return None

    return wait_for(bound, timeout, interval=0.1, what="the gateway to listen")


# --- waiting


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now, for a server about to be started on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call `predicate` until it returns something truthy and return that, or raise TimeoutError.

    The predicate is always tried at least once, and once more at the deadline.
    Exceptions from the predicate propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def wait_flower_ready(port: int, proc: Proc | None = None, timeout: float = 60) -> None:
    """Wait until Flower on 127.0.0.1:`port` answers its /healthcheck; if `proc` dies first,
    raise RuntimeError with its log tail at once."""
    from urllib.error import URLError
    from urllib.request import urlopen

    def healthy() -> bool:
        try:
            with urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                return r.status == 200
        except (URLError, OSError):
            if proc is not None and not proc.alive():
                raise RuntimeError(f"flower exited before answering:\n{proc.tail()}") from None
            return False

    wait_for(healthy, timeout, interval=0.2, what="flower to answer")


def wait_worker_ready(
    redis_url: str,
    prefix: str,
    full_name: str,
    timeout: float = 60,
    proc: Proc | None = None,
) -> WorkerState:
    """Wait until the worker's heartbeat key exists; return it parsed as `WorkerState`.

    If `proc` is given and dies first, raise RuntimeError with its log tail at once.
    """
    import redis

    from mesh.settings import MeshSettings
    from mesh.store.context import StoreContext

    key = worker_heartbeat_key(prefix, full_name)
    ctx = StoreContext.from_settings(MeshSettings(prefix=prefix, redis_url=redis_url), redis_url)

    def ready() -> WorkerState | None:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"worker {full_name} (pid {proc.pid}) exited before its heartbeat appeared; "
                f"log {proc.log_path} tail:\n{proc.tail()}"
            )
        try:
            return ctx.store.worker_state(full_name)
        except (redis.ConnectionError, redis.TimeoutError):
            return None

    try:
        return wait_for(ready, timeout, interval=0.1, what=f"heartbeat key {key!r}")
    except TimeoutError as e:
        detail = f"; log {proc.log_path} tail:\n{proc.tail()}" if proc is not None else ""
        raise TimeoutError(f"worker {full_name} not ready: {e}{detail}") from None
    finally:
        ctx.redis.close()
