"""Which Redis to talk to: an explicit URL, else the default local server if it answers.

When neither is there, the tools start an embedded one (mesh/tools/embedded.py); the library
itself only resolves and decorates URLs, so producers and workers never import the launcher.

A URL may also name Redis Sentinels instead of a server, in Celery's form
(``sentinel://host:26379;sentinel://host2:26379/0``, one ``sentinel://`` per sentinel, the
database, user and password of the master in the first one, as kombu and Celery read it), with the master's
name given apart: Celery's ``master_name`` transport option, which mesh/broker/celery_options.py
fills from MESH_SENTINEL_MASTER (docs.celeryq.dev "Using Redis: Sentinel"; kombu's
``SentinelChannel``, redis-py's ``redis.sentinel.Sentinel.master_for``). `connect` builds a
client for either kind: a Sentinel-managed client asks the sentinels for the current master
on every new connection, so after a failover it reaches the new master by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

DEFAULT_LOCAL_URL = "redis://127.0.0.1:6379/0"
SENTINEL_SCHEME = "sentinel"
SENTINEL_DEFAULT_PORT = 26379
SENTINEL_MASTER_ENV = "MESH_SENTINEL_MASTER"
# a query to a sentinel (which server is the master now) must not wait as long as a command
# may: a dead sentinel is skipped after this many seconds and the next one asked
SENTINEL_QUERY_TIMEOUT_S = 2.0


class FollowingConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels where the master is on every
    (re)connection. redis-py's asks only when the pool hands out a disconnected connection
    (`SentinelManagedConnection.connect`); a connection that breaks inside a command or a
    pipeline reconnects in its retry loop to the address it had (`connect_check_health`), the
    dead master, so every retry of a results pipeline went there until the store gave up."""

    def _connect(self):
        pool = self.connection_pool
        if pool.is_master:
            self.host, self.port = pool.get_master_address()  # MasterNotFoundError: retried
        return super()._connect()


def sentinel_retry() -> Retry:
    """Retries of a Sentinel-managed connection: ~7 s of backoff (0.1 s doubling to 1 s).

    redis-py gives a connection made through `Sentinel.master_for` no retry at all, so a
    (re)connection during a failover, while the sentinels still name the dead master or name
    none yet (MasterNotFoundError), fails at once; Celery's consumer then waits 2, 4, 6 s
    between its reconnection rounds, and measured reconnects came 6-15 s after the kill.
    Retrying the connect (and a command whose connection broke: FollowingConnection asks the
    sentinels again each time) through the failover reaches the new master as soon as the
    sentinels name it."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.1), 10)

__all__ = [
    "DEFAULT_LOCAL_URL",
    "FollowingConnection",
    "SentinelUrl",
    "connect",
    "is_sentinel",
    "parse_sentinel_url",
    "probe",
    "resolve_redis_url",
    "sentinel_master",
    "sentinel_retry",
    "with_tls_options",
]


def is_sentinel(url: str | None) -> bool:
    """Whether `url` names Redis Sentinels (``sentinel://...``) rather than one server."""
    return bool(url) and url.split("://", 1)[0].strip().lower() == SENTINEL_SCHEME  # type: ignore[union-attr]


@dataclass(frozen=True)
class SentinelUrl:
    """A ``sentinel://h1:p1;sentinel://h2:p2/db`` URL, parsed as Celery's SentinelBackend does
    (celery/backends/redis.py ``SentinelBackend._params_from_url``): the sentinels' addresses,
    and the database, user and password of the master from the first part (kombu and Celery
    read them there only, so a database given on a later part alone would split the mesh)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a Sentinel URL; ValueError saying what is wrong with it otherwise."""
    sentinels: list[tuple[str, int]] = []
    db: int | None = None
    username = password = None
    for i, part in enumerate(p.strip() for p in url.split(";")):
        if not part:
            continue
        parts = urlsplit(part)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"every part of a Sentinel URL must start with sentinel://, not {parts.scheme}://")
        try:
            port = parts.port or SENTINEL_DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"bad port in Sentinel URL part {part.split('@')[-1]!r}") from exc
        if not parts.hostname:
            raise ValueError("a Sentinel URL part without a host")
        sentinels.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database of a Sentinel URL must be a number, not {path!r}")
        if i == 0:
            db = int(path) if path else 0
        elif path and int(path) != db:
            raise ValueError("the database of a Sentinel URL goes on its first part (kombu and Celery read it there)")
        if i == 0 and parts.password is not None:
            username, password = (unquote(parts.username) if parts.username else None), unquote(parts.password)
    if not sentinels:
        raise ValueError("a Sentinel URL names no sentinel")
    return SentinelUrl(tuple(sentinels), db or 0, username, password)


def sentinel_master(explicit: str | None = None) -> str:
    """The name of the master the sentinels monitor: `explicit`, else $MESH_SENTINEL_MASTER."""
    name = explicit or os.environ.get(SENTINEL_MASTER_ENV, "").strip()
    if not name:
        raise ValueError(
            "a sentinel:// Redis URL needs the name of the master the sentinels monitor: "
            f"set {SENTINEL_MASTER_ENV} (Celery's `master_name` transport option)"
        )
    return name


def connect(url: str, *, master_name: str | None = None, **options: Any) -> redis.Redis:
    """A redis-py client for `url` with connection `options`: ``Redis.from_url`` for a server,
    or for a Sentinel URL the client of its current master (`master_name`, else
    $MESH_SENTINEL_MASTER), which follows a failover: each new connection asks the sentinels
    where the master is, and a connection to a server that stopped being the master is dropped
    (redis-py's SentinelManagedConnection: ReadOnlyError becomes a ConnectionError)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    spec = parse_sentinel_url(url)
    name = sentinel_master(master_name)
    timeouts = {
        k: min(float(options.get(k) or SENTINEL_QUERY_TIMEOUT_S), SENTINEL_QUERY_TIMEOUT_S)
        for k in ("socket_timeout", "socket_connect_timeout")
    }
    credentials = {k: v for k, v in (("username", spec.username), ("password", spec.password)) if v}
    options.setdefault("retry", sentinel_retry())
    options.setdefault("connection_class", FollowingConnection)
    sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs=timeouts)
    return sentinel.master_for(name, db=spec.db, **credentials, **options)


def probe(url: str, timeout: float = 0.3) -> bool:
    """True if a Redis at `url` answers PING within `timeout` seconds; False on any error."""
    # a probe answers within its timeout: no retrying through a failover (sentinel_retry)
    once = {"retry": Retry(NoBackoff(), 0)} if is_sentinel(url) else {}
    try:
        client = connect(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            **once,
        )
    except (ValueError, redis.RedisError):
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        try:
            client.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass


def resolve_redis_url(explicit: str | None = None) -> str | None:
    """The Redis URL to use, or None when the caller must start an embedded server.

    `explicit` or ``$MESH_REDIS_URL`` (when non-empty) is returned as is, without probing:
    the user asked for that server. Otherwise the default local server if it answers PING.
    """
    if explicit:
        return explicit
    env = os.environ.get("MESH_REDIS_URL")
    if env:
        return env
    if probe(DEFAULT_LOCAL_URL):
        return DEFAULT_LOCAL_URL
    return None


def with_tls_options(
    url: str,
    ca_certs: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> str:
    """A ``rediss://`` URL carrying its TLS options as query parameters.

    redis-py, kombu and Celery's result backend all read them from the URL, so every client
    built from it (producers, workers, scheduler) verifies the server the same way. The
    certificate is verified (``ssl_cert_reqs=required``) unless the URL says otherwise, and
    options already in the URL win. Any other URL is returned unchanged.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    wanted = {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": ca_certs,
        "ssl_certfile": certfile,
        "ssl_keyfile": keyfile,
    }
    added = {k: v for k, v in wanted.items() if v and k not in query}
    if not added:
        return url
    query.update(added)
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="/")))
