"""Build the control-plane store (settings, Redis client, Keys, StateStore) from a Celery app or
from settings: the one place that decides how a control-plane Redis client is configured."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.redis_url import connect
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings
from mesh.store.state import StateStore

if TYPE_CHECKING:
    from celery import Celery

# Every control-plane client (producers, workers, the scheduler, the tools) uses these; options
# given in the URL's query string win (redis-py), so an operator can still tune one deployment.
REDIS_CLIENT_OPTIONS: Final[dict[str, float]] = {
    # PING a connection idle this long before using it, so one that a proxy, load balancer or
    # NAT dropped silently is replaced instead of failing the command (the broker's value,
    # mesh/broker/celery_options.py, below the usual 30 s idle cut-offs).
    "health_check_interval": 25,
    # An unreachable host fails in seconds rather than the OS's minutes-long TCP timeout.
    "socket_connect_timeout": 5,
    # Long enough for the slowest legitimate call: the scheduler's bulk reads at 100,000 models
    # (HGETALL of the registry, pipelines of 1,000 models, mesh/store/cluster.py). The only
    # server-side waits are short (a worker's BRPOP on the wanted list, 1 s: StateStore.pop_wanted)
    # and every Lua script is short, so only a hung server hits it.
    "socket_timeout": 30,
}

# One client per URL for callers that build a context on every call (the scheduler runs once
# per beat tick): a fresh client each time would open a new connection per run and leave its
# pool to the garbage collector. redis-py clients are thread-safe, so sharing one is fine.
_shared: dict[tuple[str, str | None], redis.Redis] = {}
_shared_lock = threading.Lock()


def is_permission_error(exc: BaseException | None) -> bool:
    """Whether Redis refused a command for the user's ACL: NOPERM, or a script's command on a
    key the user may not touch (Redis 7 reports that one as a plain script error); also when
    wrapped (kombu raises OperationalError from the redis-py error)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return True
        text = str(exc)
        if isinstance(exc, redis.exceptions.ResponseError) and (
            "NOPERM" in text or "can't access at least one of the keys" in text
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def redis_client(url: str, *, shared: bool = False, retry: bool = True,
                 master_name: str | None = None) -> redis.Redis:  # fmt: skip
    """A control-plane client for `url` with REDIS_CLIENT_OPTIONS; with `shared`, the process's
    one client for that URL. Without `retry`, a command fails at the first connection error
    instead of redis-py's default retries (for a caller with its own backoff, whose blocking
    command must end when its connection is closed under it). A sentinel:// URL gives the
    client of master `master_name` (else $MESH_SENTINEL_MASTER), which follows failovers
    (mesh/broker/redis_url.py `connect`)."""
    if not shared:
        if not retry:
            return connect(url, master_name=master_name, **REDIS_CLIENT_OPTIONS, retry=Retry(NoBackoff(), 0))
        return connect(url, master_name=master_name, **REDIS_CLIENT_OPTIONS)
    with _shared_lock:
        client = _shared.get((url, master_name))
        if client is None:
            client = _shared[(url, master_name)] = connect(url, master_name=master_name, **REDIS_CLIENT_OPTIONS)
        return client


@dataclass(frozen=True)
class StoreContext:
    """Everything that reads or writes one mesh's control-plane state."""

    settings: MeshSettings
    redis: redis.Redis
    keys: Keys
    store: StateStore

    @classmethod
    def from_settings(cls, settings: MeshSettings, url: str, *, shared: bool = False) -> StoreContext:
        """The context of the mesh `settings` names, on the Redis at `url` (already resolved and
        carrying its TLS options: mesh/broker/redis_url.py)."""
        client = redis_client(url, shared=shared, master_name=settings.sentinel_master)
        keys = Keys(settings.prefix)
        return cls(settings=settings, redis=client, keys=keys, store=StateStore(client, keys, settings))

    @classmethod
    def from_app(cls, app: Celery, *, shared: bool = False) -> StoreContext:
        """The context of the mesh a Celery app was configured for. The app's prefix and URL win
        over the environment, so a worker or router of a custom MeshClient app (tests) and its
        producers always agree."""
        conf = app.conf
        master = (conf.broker_transport_options or {}).get("master_name")
        settings = MeshSettings(prefix=conf.mesh_prefix, redis_url=conf.mesh_redis_backend_url, sentinel_master=master)
        return cls.from_settings(settings, conf.mesh_redis_backend_url, shared=shared)


__all__ = ["REDIS_CLIENT_OPTIONS", "StoreContext", "is_permission_error", "redis_client"]
