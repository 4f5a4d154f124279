"""Requests of models that are gone, and commands about them (docs/reliability.md, "Gone models
and stale commands").

- A worker SIGKILLed while holding a request, then the model unregistered: the visibility sweep
  puts the request back into a queue nobody reads any more. It is answered NOT_FOUND by the
  stray sweep (workers/strays.py), not left for its `get()` to time out. A model registered
  again before the grace ends keeps its requests.
- A worker SIGKILLed, the model unregistered and registered again, the worker restarted with
  the same name: the unload command left in its private queue is stale (it names the earlier
  registration) and must not fail the requests of the new one.

The visibility timeout is not waited out (its minimum is 10 s, plus a restore interval): the
tests restore the dead worker's unacked messages the way kombu does (kombu/transport/redis.py
`QoS.restore_by_tag` and `Channel._do_restore_message`), which is deterministic.
"""

from __future__ import annotations

import json
from bisect import bisect

import pytest

from mesh.errors import ModelNotFound
from mesh.tools.launcher import wait_for

from .helpers import X, copies_of, slow_info, wait_loaded

SWEEP = {"MESH_STRAY_SWEEP_INTERVAL_S": "0.5", "MESH_STRAY_GRACE_S": "1"}


def restore_unacked(client) -> int:
    """Put every unacked message back at the consuming end of its queue, as kombu's restore
    does (one transaction per message: removed from the unacked hash and index, pushed back)."""
    r, kp = client.store.r, client.keys.kombu_prefix
    steps = sorted(client.app.conf.broker_transport_options.get("priority_steps", [0]))
    restored = 0
    for tag, raw in r.hgetall(kp + "unacked").items():
        message, _exchange, routing_key = json.loads(raw)
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
        priority = message["properties"].get("priority") or 0
        step = steps[max(0, bisect(steps, priority) - 1)]
        with r.pipeline() as p:
            p.zrem(kp + "unacked_index", tag)
            p.hdel(kp + "unacked", tag)
            p.rpush(client.keys.queue_list_key(routing_key, step), json.dumps(message))
            p.execute()
        restored += 1
    return restored


def _held_by_a_killed_worker(client, workers, tmp_path, env):
    """A request held (running its batch) by a worker that is then SIGKILLed; the survivor
    is another worker of the pool. Returns the request's handle."""
    holder = workers("w1", **env)
    client.register_model("m", slow_info(tmp_path, "m", delay=300))  # a batch that outlives the test
    wait_loaded(client, "m")
    workers("w2", **env)
    result = client.infer(model_id="m", inputs=[X])
    unacked = client.keys.kombu_prefix + "unacked"
    wait_for(lambda: client.store.r.hlen(unacked) == 1, 30, what="the request to be held by w1")
    holder.kill()
    return result


def test_a_request_put_back_after_its_model_was_unregistered_is_answered_not_found(client, workers, tmp_path):
    result = _held_by_a_killed_worker(client, workers, tmp_path, SWEEP)
    client.unregister_model("m")
    assert restore_unacked(client) == 1
    with pytest.raises(ModelNotFound, match="'m' is not registered"):
        result.get(timeout=30)
    assert client.store.queue_depth("m", [0, 5]) == 0
    assert not client.store.r.exists(client.keys.strays_held, client.keys.strays)


def test_a_model_registered_again_within_the_grace_keeps_the_requests_put_back(client, workers, tmp_path):
    # a grace far longer than the re-registration below takes
    result = _held_by_a_killed_worker(client, workers, tmp_path, {**SWEEP, "MESH_STRAY_GRACE_S": "60"})
    client.unregister_model("m")
    assert restore_unacked(client) == 1
    # seen stray by a sweep, then registered again (a fast model this time) and loaded
    wait_for(lambda: client.store.r.hexists(client.keys.strays, "m"), 30, what="a sweep to see the queue")
    client.register_model("m", slow_info(tmp_path, "m-fast"))
    wait_loaded(client, "m")
    assert result.get(timeout=60)["outputs"][0]["data"] == [10.0]


def test_a_stale_unload_command_does_not_fail_the_requests_of_a_model_registered_again(
    client, workers, tmp_path
):
    # a long heartbeat TTL: the killed worker still counts as alive while the model is
    # unregistered, so the unload command goes to its private queue and waits there
    w1 = workers("w1", MESH_HEARTBEAT_TTL_S="60")
    client.register_model("m", slow_info(tmp_path, "m"))
    wait_loaded(client, "m")
    assert list(copies_of(client, "m")) == [w1.full_name]
    w1.kill()
    client.unregister_model("m")
    commands = client.keys.queue_list_key(client.keys.worker_queue(w1.full_name), 0)
    assert client.store.r.llen(commands) == 1  # the unload, for nobody to read until w1 is back
    # registered again; its load (placed on w1, which still looks alive) waits at a gate, so
    # the requests are queued when w1 reads the stale unload, whatever the threads' order
    gate = tmp_path / "gate"
    gate.touch()
    client.register_model("m", slow_info(tmp_path, "m2", gate=gate))
    results = [client.infer(model_id="m", inputs=[X]) for _ in range(5)]
    assert client.store.r.llen(commands) == 2  # the unload, then the load
    workers("w1")  # the same name: it reads the stale unload first
    wait_for(lambda: client.store.r.llen(commands) == 0, 30, what="w1 to read its commands")
    gate.unlink()
    wait_loaded(client, "m")
    results += [client.infer(model_id="m", inputs=[X]) for _ in range(5)]
    assert [r.get(timeout=60)["outputs"][0]["data"] for r in results] == [[10.0]] * 10
