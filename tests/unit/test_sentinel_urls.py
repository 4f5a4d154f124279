"""sentinel:// URLs (docs/operations.md "Redis Sentinel"): parsed as kombu and Celery read them,
the master's name from MESH_SENTINEL_MASTER into Celery's `master_name` transport options, and
every client built from them Sentinel-managed. No server needed: nothing here connects."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from mesh.broker.celery_options import SENTINEL_TRANSPORT, TRANSPORT, mesh_celery_settings
from mesh.broker.redis_url import FollowingConnection, SentinelUrl, connect, is_sentinel, parse_sentinel_url, sentinel_master
from mesh.broker.transport import SentinelChannel, redis_server
from mesh.settings import MeshSettings
from mesh.store.context import REDIS_CLIENT_OPTIONS, redis_client

URL = "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_parse_takes_every_sentinel_and_the_master_database_and_password_from_the_first_part():
    assert parse_sentinel_url(URL) == SentinelUrl(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)), db=2, password="pw"
    )
    assert is_sentinel(URL) and is_sentinel("SENTINEL://h") and not is_sentinel("redis://h") and not is_sentinel(None)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("sentinel://h:1;redis://h:2", "must start with sentinel://"),
        ("sentinel://h:1/x", "must be a number"),
        ("sentinel://h:1;sentinel://h:2/3", "goes on its first part"),
        ("sentinel://h:99999", "bad port"),
        ("sentinel://", "without a host"),
    ],
)
def test_a_bad_sentinel_url_says_what_is_wrong(url, reason):
    with pytest.raises(ValueError, match=reason):
        parse_sentinel_url(url)


def test_the_master_name_is_required(monkeypatch):
    monkeypatch.delenv("MESH_SENTINEL_MASTER", raising=False)
    with pytest.raises(ValueError, match="MESH_SENTINEL_MASTER"):
        sentinel_master()
    monkeypatch.setenv("MESH_SENTINEL_MASTER", "env-name")
    assert sentinel_master() == "env-name" and sentinel_master("explicit") == "explicit"


def test_celery_settings_name_the_sentinel_transport_backend_and_master():
    conf = mesh_celery_settings(MeshSettings(redis_url=URL, sentinel_master="mm", prefix="p"))
    assert conf["broker_transport"] == SENTINEL_TRANSPORT
    assert conf["result_backend"] == "mesh.broker.results:SentinelBackend+" + URL
    assert conf["broker_transport_options"]["master_name"] == "mm"
    assert conf["result_backend_transport_options"]["master_name"] == "mm"
    plain = mesh_celery_settings(MeshSettings(redis_url="redis://h:1/0", prefix="p"))
    assert plain["broker_transport"] == TRANSPORT and "master_name" not in plain["broker_transport_options"]
    assert plain["result_backend"] == "mesh.broker.results:RedisBackend+redis://h:1/0"


def test_celery_settings_refuse_a_sentinel_url_without_a_master(monkeypatch):
    monkeypatch.delenv("MESH_SENTINEL_MASTER", raising=False)
    with pytest.raises(ValueError, match="MESH_SENTINEL_MASTER"):
        mesh_celery_settings(MeshSettings(redis_url=URL, prefix="p"))


def test_clients_of_a_sentinel_url_follow_the_master():
    client = redis_client(URL, master_name="mm")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mm"
    for name, value in REDIS_CLIENT_OPTIONS.items():
        assert pool.connection_kwargs[name] == value, name
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    # every reconnection asks the sentinels (not the address it had), and retries through a failover
    assert pool.connection_class is FollowingConnection
    assert pool.connection_kwargs["retry"].get_retries() == 10
    assert redis_client(URL, master_name="mm", retry=False).connection_pool.connection_kwargs["retry"].get_retries() == 0
    # the sentinels are asked with short timeouts, whatever the commands' timeout is
    sentinel = pool.sentinel_manager.sentinels[0]
    assert sentinel.connection_pool.connection_kwargs["socket_timeout"] <= 2.0
    # an ack batched into the results pipeline needs the same server: the master it follows
    assert redis_server(client) == (("sentinel", "mm"), 2)
    assert redis_server(connect("redis://h:1/3")) == (("h", 1), 3)


def test_the_sentinel_channel_and_backend_use_following_connections():
    from mesh.broker.results import SentinelBackend

    assert SentinelChannel.connection_class is FollowingConnection
    assert issubclass(SentinelBackend, __import__("celery.backends.redis", fromlist=["x"]).SentinelBackend)


def test_the_sentinel_channel_reads_the_sentinel_options():
    for option in ("master_name", "sentinel_kwargs", "min_other_sentinels", "mesh_holder", "mesh_max_deliveries"):
        assert option in SentinelChannel.from_transport_options


def test_a_probe_of_unreachable_sentinels_says_no(monkeypatch):
    from mesh.broker.redis_url import probe

    monkeypatch.setenv("MESH_SENTINEL_MASTER", "mm")
    assert probe("sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", timeout=0.3) is False
    monkeypatch.delenv("MESH_SENTINEL_MASTER")
    assert probe("sentinel://127.0.0.1:1", timeout=0.3) is False  # no master name: not usable
