"""A real Redis Sentinel deployment on loopback for one test: a master, a replica and three
sentinels, all the system's redis-server (``--sentinel`` for the sentinels), on free ports,
each stopped by its pid at the end. Failure detection is tuned down (1 s) so a failover takes
seconds, not the default 30 s."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from mesh.tools.launcher import free_port, wait_for

MASTER_NAME = "meshmaster"
DOWN_AFTER_MS = 1000


def redis_server_binary() -> str | None:
    """The system redis-server (the sentinels need the full binary: `--sentinel`)."""
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class SentinelRig:
    def __init__(self, directory: Path, binary: str) -> None:
        self.directory, self.binary = directory, binary
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # ---- lifecycle
    def _spawn(self, name: str, config: str, *extra: str) -> None:
        d = self.directory / name
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "redis.conf"
        conf.write_text(config + f'dir "{d}"\n')
        log = open(d / "log", "wb")
        self.procs[name] = subprocess.Popen([self.binary, str(conf), *extra], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _start(self) -> None:
        for name in ("master", "replica", "s1", "s2", "s3"):
            self.ports[name] = free_port()
        base = 'bind 127.0.0.1\nsave ""\nappendonly no\nprotected-mode no\n'
        self._spawn("master", base + f"port {self.ports['master']}\n")
        self._spawn("replica", base + f"port {self.ports['replica']}\nreplicaof 127.0.0.1 {self.ports['master']}\n")
        for name in ("s1", "s2", "s3"):
            self._spawn(name, (
                f"bind 127.0.0.1\nport {self.ports[name]}\nprotected-mode no\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['master']} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            ), "--sentinel")  # fmt: skip
        replica = self.server("replica")
        wait_for(lambda: _ping(replica) and replica.info("replication").get("master_link_status") == "up",
                 30, interval=0.1, what="the replica to sync with the master")  # fmt: skip

        # a failover needs the sentinels to know the replica and each other (hello messages)
        def ready() -> bool:
            for name in ("s1", "s2", "s3"):
                try:
                    m = self.sentinel(name).sentinel_master(MASTER_NAME)
                except redis.RedisError:
                    return False
                if int(m.get("num-other-sentinels", 0)) < 2 or int(m.get("num-slaves", 0)) < 1:
                    return False
            return True

        wait_for(ready, 60, interval=0.2, what="the sentinels to discover each other and the replica")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
                pass

    # ---- access
    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{self.ports[n]}" for n in ("s1", "s2", "s3"))

    def server(self, name: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[name], socket_timeout=5, socket_connect_timeout=2)

    def sentinel(self, name: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[name], socket_timeout=5, socket_connect_timeout=2,
                           decode_responses=True)  # fmt: skip

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers sees it."""
        for name in ("s1", "s2", "s3"):
            try:
                addr = self.sentinel(name).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def kill_master(self) -> float:
        """SIGKILL the master (no shutdown, nothing flushed); returns the monotonic time."""
        self.procs["master"].send_signal(signal.SIGKILL)
        self.procs["master"].wait(timeout=10)
        return time.monotonic()

    def wait_failover(self, timeout: float = 60) -> None:
        """Until the sentinels name the replica as the master and it accepts writes."""
        replica = self.server("replica")
        wait_for(lambda: self.master_port() == self.ports["replica"]
                 and replica.info("replication").get("role") == "master", timeout, interval=0.1,
                 what="the sentinels to promote the replica")  # fmt: skip


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
