"""The mesh-dependent part of the Celery configuration (URL, prefixes, timeouts).

celeryconfig.py holds the static Celery settings; this computes the rest from MeshSettings so
that a MeshClient with its own `redis_url`/`prefix` gets a correctly namespaced Celery app.
"""

from __future__ import annotations

from typing import Any

from mesh.broker.redis_url import (
    DEFAULT_LOCAL_URL,
    is_sentinel,
    parse_sentinel_url,
    resolve_redis_url,
    sentinel_master,
    with_tls_options,
)
from mesh.broker.results import backend_setting
from mesh.protocol.keys import Keys
from mesh.protocol.messages import PRIORITY_STEPS, REBALANCE_TASK, SYNC_REPOSITORY_TASK
from mesh.settings import MeshSettings, get_settings


# kombu's Redis transport, hardened (mesh/broker/transport.py); its Sentinel flavour for
# sentinel:// URLs (kombu picks a transport by URL scheme only when none is configured)
TRANSPORT = "mesh.broker.transport:Transport"
SENTINEL_TRANSPORT = "mesh.broker.transport:SentinelTransport"


def mesh_celery_settings(settings: MeshSettings | None = None, redis_url: str | None = None) -> dict[str, Any]:
    s = settings or get_settings()
    url = redis_url or resolve_redis_url(s.redis_url) or DEFAULT_LOCAL_URL
    url = with_tls_options(url, s.redis_ca_certs, s.redis_certfile, s.redis_keyfile)
    keys = Keys(s.prefix)
    # Sentinel: Celery's convention, the master's name as the `master_name` transport option
    # of the broker and of the result backend (docs.celeryq.dev "Using Redis: Sentinel")
    sentinel: dict[str, Any] = {}
    if is_sentinel(url):
        parse_sentinel_url(url)  # a bad URL fails here, with the reason, not in a worker's loop
        sentinel = {"master_name": sentinel_master(s.sentinel_master)}
    return {
        "broker_url": url,
        "broker_transport": SENTINEL_TRANSPORT if sentinel else TRANSPORT,
        # Celery's Redis backend whose producers outlive a Redis outage (mesh/broker/results.py)
        "result_backend": backend_setting(url),
        "result_expires": s.result_expires_s,
        "broker_transport_options": {
            "global_keyprefix": keys.kombu_prefix,
            "visibility_timeout": s.visibility_timeout_s,
            "polling_interval": s.polling_interval_s,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "round_robin",
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # kombu's sweep lock (QoS.restore_visible's Mutex) lives 300 s by default: a worker
            # killed inside its sweep stopped every worker's sweep for 5 minutes. A sweep takes
            # milliseconds, and two that overlap restore each message once (restore_by_tag
            # is a WATCH transaction that finds the record gone the second time).
            "unacked_mutex_expire": 30,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 25,
            # mesh/broker/transport.py: dead-letter after this many failed deliveries (the
            # worker adds its holder id, mesh_holder, at start: workers/worker.py)
            "mesh_max_deliveries": s.max_deliveries,
            **sentinel,
        },
        "result_backend_transport_options": {
            "global_keyprefix": keys.kombu_prefix,
            "retry_policy": {"timeout": 5.0},
            **sentinel,
        },
        "task_default_queue": f"{s.prefix}.default",
        "event_exchange": f"{s.prefix}.celeryev",
        "control_exchange": f"{s.prefix}.pidbox",
        "mesh_prefix": s.prefix,
        # the URL may hold a password: Celery's `inspect conf` (Flower's worker page) shows
        # every setting and masks the password only in keys named like this one
        "mesh_redis_backend_url": url,
        # celery beat: the scheduler run, on the control queue that every mesh worker consumes;
        # a message older than one interval is dropped (the next one is already on its way)
        "beat_schedule": {
            "mesh-rebalance": {
                "task": REBALANCE_TASK,
                "schedule": s.rebalance_interval_s,
                "options": {
                    "queue": keys.control_queue,
                    "expires": s.rebalance_interval_s,
                    "priority": 0,
                },
            },
            **_repository_schedule(s, keys),
        },
    }


def _repository_schedule(s: MeshSettings, keys: Keys) -> dict[str, Any]:
    """mesh.sync_repository, only when this (beat) process has MESH_MODEL_DIR (docs/storage.md)."""
    if not s.model_dir:
        return {}
    return {
        "mesh-sync-repository": {
            "task": SYNC_REPOSITORY_TASK,
            "schedule": s.repository_sync_interval_s,
            "options": {"queue": keys.control_queue, "expires": s.repository_sync_interval_s},
        },
    }
