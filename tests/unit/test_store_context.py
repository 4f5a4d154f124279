"""The store context factory against a real Redis: every control-plane client gets the one set
of client options, from a Celery app or from settings, and the scheduler's client is shared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

from mesh.settings import MeshSettings
from mesh.store.context import REDIS_CLIENT_OPTIONS, StoreContext, redis_client
from mesh.store.state import StateStore


@pytest.fixture
def app(redis_url: str, prefix: str) -> Iterator[Celery]:
    app = Celery("test-store-context", set_as_current=False)
    app.conf.update(mesh_prefix=prefix, mesh_redis_backend_url=redis_url)
    yield app
    app.close()


def _options(ctx: StoreContext) -> dict:
    return ctx.redis.connection_pool.connection_kwargs


def test_from_settings_applies_the_client_options_and_wires_the_store(redis_url, prefix):
    ctx = StoreContext.from_settings(MeshSettings(prefix=prefix), redis_url)
    try:
        for name, value in REDIS_CLIENT_OPTIONS.items():
            assert _options(ctx)[name] == value, name
        assert isinstance(ctx.store, StateStore)
        assert ctx.store.r is ctx.redis and ctx.store.keys is ctx.keys and ctx.store.settings is ctx.settings
        assert ctx.keys.prefix == prefix
        assert ctx.redis.ping()
        conn = ctx.redis.connection_pool.get_connection()
        try:
            assert conn.socket_timeout == REDIS_CLIENT_OPTIONS["socket_timeout"]
            assert conn.socket_connect_timeout == REDIS_CLIENT_OPTIONS["socket_connect_timeout"]
            assert conn.health_check_interval == REDIS_CLIENT_OPTIONS["health_check_interval"]
        finally:
            ctx.redis.connection_pool.release(conn)
    finally:
        ctx.redis.close()


def test_from_app_takes_prefix_and_url_from_the_app_conf(app, redis_url, prefix):
    ctx = StoreContext.from_app(app)
    try:
        assert ctx.settings.prefix == prefix and ctx.settings.redis_url == redis_url
        assert ctx.keys.prefix == prefix
        assert _options(ctx)["socket_timeout"] == REDIS_CLIENT_OPTIONS["socket_timeout"]
        ctx.store.r.set(ctx.keys.rebalance_last, "{}")
        assert ctx.store.last_rebalance() == b"{}"
    finally:
        ctx.redis.close()


def test_options_in_the_url_win(redis_url):
    sep = "&" if "?" in redis_url else "?"
    client = redis_client(f"{redis_url}{sep}socket_timeout=7")
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 7
        assert kwargs["health_check_interval"] == REDIS_CLIENT_OPTIONS["health_check_interval"]
    finally:
        client.close()


def test_shared_contexts_reuse_one_client_per_url(app):
    first, second = StoreContext.from_app(app, shared=True), StoreContext.from_app(app, shared=True)
    assert first.redis is second.redis
    assert first.store is not second.store  # only the connection pool is shared
    own = StoreContext.from_app(app)
    try:
        assert own.redis is not first.redis
    finally:
        own.redis.close()
