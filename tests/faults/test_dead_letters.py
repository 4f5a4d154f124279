"""Poison messages (docs/reliability.md, "Dead letters"): a message whose deliveries keep ending
with its worker dead is not delivered again after MESH_MAX_DELIVERIES of them. It goes to the
dead-letter list, its producer is answered with DeliveryLimitExceeded, and `mesh dead-letters`
lists, requeues and purges it.

The deaths are played by hand, deterministically: the transport's own pop script takes the
request as a worker process ("holder") would, the holder's alive key is deleted (what its
TTL running out does when the process is SIGKILLed), and a live worker's failover script puts
the request back, counting the failed delivery. A real worker then takes the request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.broker.transport import POP_AND_RECORD, pop_keys_args
from mesh.errors import DeliveryLimitExceeded
from mesh.store.failover import FailoverStore
from mesh.tools.launcher import wait_for

from .helpers import X, slow_info, wait_loaded

MESH = Path(sys.executable).parent / "mesh"
MAX_DELIVERIES = 5  # MESH_MAX_DELIVERIES's default


@pytest.fixture
def mesh_cli(redis_url, prefix, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    base.update(MESH_REDIS_URL=redis_url, MESH_PREFIX=prefix, COLUMNS="250", NO_COLOR="1")

    def run(*args: str) -> str:
        proc = subprocess.run([str(MESH), *args], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    return run


def _die_holding(client, failover: FailoverStore, lists: list[str], holder: str) -> int:
    """A worker process `holder` takes every request waiting in `lists` and dies; a live
    worker's failover puts them back. Returns how many it held."""
    r = client.store.r
    keys, args = pop_keys_args(client.keys.kombu_prefix, lists, now=time.time(), most=100, holder=holder,
                               max_deliveries=MAX_DELIVERIES)  # fmt: skip
    taken = r.register_script(POP_AND_RECORD)(keys=keys, args=args)
    assert all(tag not in (b"", 1) for tag in taken[2::3])  # recorded with their holder, none dead-lettered
    r.delete(client.keys.holder_alive(holder))  # SIGKILL: the alive key is not refreshed
    assert failover.restore_holder(holder).count == len(taken) // 3
    return len(taken) // 3


def test_a_message_whose_workers_keep_dying_is_dead_lettered_and_answered(client, workers, tmp_path, mesh_cli):
    client.register_model("m", slow_info(tmp_path, "m"))
    first = client.infer(model_id="m", inputs=[X])
    second = client.infer(model_id="m", inputs=[X])
    failover = FailoverStore(client.store.r, client.keys)
    lists = client.keys.queue_list_keys(client.keys.model_queue("m"), [0, 5])
    for death in range(MAX_DELIVERIES):
        assert _die_holding(client, failover, lists, f"ghost{death}@host.{death}") == 2
    assert client.store.queue_depth("m", [0, 5]) == 2  # both back, each delivered 5 times

    # a real worker takes them now: a sixth delivery is refused, the producers are answered
    workers("w1")
    for handle in (first, second):
        with pytest.raises(DeliveryLimitExceeded):
            handle.get(timeout=60)
    assert client.store.r.hlen(client.keys.unacked) == 0
    entries = failover.dead_letters()
    assert sorted(e.task_id for e in entries) == sorted([first.id, second.id])
    assert {(e.queue, e.deliveries, e.task) for e in entries} == {("%s.model.m" % client.keys.prefix, 5, "mesh.infer")}

    # the CLI lists them, requeues one (answered by the worker, the model loaded by now), purges the other
    listed = mesh_cli("dead-letters", "list")
    assert first.id in listed and second.id in listed
    as_json = json.loads(mesh_cli("dead-letters", "list", "--json"))
    assert {e["task_id"] for e in as_json} == {first.id, second.id}
    assert all(e["message"]["headers"]["id"] == e["task_id"] for e in as_json)
    by_id = {e.task_id: e for e in entries}
    wait_loaded(client, "m")
    assert "requeued 1 dead letter(s)" in mesh_cli("dead-letters", "requeue", by_id[first.id].tag)
    result_key = client.app.backend.get_key_for_task(first.id)
    wait_for(lambda: json.loads(client.store.r.get(result_key) or b"{}").get("status") == "SUCCESS", 60,
             what="the requeued request to be answered")  # fmt: skip
    assert "purged 1 dead letter(s)" in mesh_cli("dead-letters", "purge", by_id[second.id].tag)
    assert failover.dead_letters() == []
    assert client.store.r.hlen(client.keys.deliveries) == 0  # nothing counted for an acked message


def test_a_request_that_kills_every_worker_that_takes_it_is_dead_lettered(client, workers, tmp_path):
    """The real thing, with MESH_MAX_DELIVERIES=2: a request whose predict SIGKILLs its worker
    kills two workers, one after the other (the second takes it from failover), and the third
    dead-letters it and answers its producer; the third worker lives on and serves."""
    env = {"MESH_MAX_DELIVERIES": "2"}
    info = slow_info(tmp_path, "d").model_copy(update={"python_class": "tests.faults.fault_models:Deadly"})
    client.register_model("d", info)
    poison = {**X, "data": [-1.0, 2.0, 3.0, 4.0]}
    w1 = workers("w1", **env)
    wait_loaded(client, "d")
    handle = client.infer(model_id="d", inputs=[poison])
    wait_for(lambda: not w1.alive(), 60, what="the poison to kill w1")
    w2 = workers("w2", **env)  # puts back what w1 held once w1's alive key expires, and takes it
    wait_for(lambda: not w2.alive(), 60, what="the poison, put back by failover, to kill w2")
    w3 = workers("w3", **env)
    with pytest.raises(DeliveryLimitExceeded):
        handle.get(timeout=60)
    [entry] = FailoverStore(client.store.r, client.keys).dead_letters()
    assert (entry.task_id, entry.deliveries) == (handle.id, 2)
    assert w3.alive()
    assert client.infer(model_id="d", inputs=[X]).get(timeout=60)["outputs"][0]["data"] == [10.0]
