"""Which Redis to talk to: an explicit URL, else the default local server if it answers.

When neither is there, the tools start an embedded one (mesh/tools/embedded.py); the library
itself only resolves and decorates URLs, so producers and workers never import the launcher.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis

DEFAULT_LOCAL_URL = "redis://127.0.0.1:6379/0"

__all__ = ["DEFAULT_LOCAL_URL", "probe", "resolve_redis_url", "with_tls_options"]


def probe(url: str, timeout: float = 0.3) -> bool:
    """True if a Redis at `url` answers PING within `timeout` seconds; False on any error."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
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
