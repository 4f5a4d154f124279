"""Redis ACL rules for a mesh's two kinds of user (docs/security.md, "Redis ACLs"; Redis >= 7.0
for read-only key patterns): an operator, who runs workers, beat and management, and a
producer, who may send inference requests and read results but not manage the mesh.

What a producer writes, and why each pattern is there (everything else it only reads):
- `<p>:<p>.model.*`: model queues (the request itself, kombu's priority sub-lists included);
- `<p>:_kombu.bell.<p>.model.*`: their bells, rung with each push (mesh/broker/transport.py);
- `<p>:_kombu.binding[_permanent].<p>.model.*`: kombu's binding tables of model queues, which
  a plain `send_task` declares;
- `<p>:reply.*`: its reply list, which it pops (mesh/broker/replies.py);
- `<p>:wanted`: models it asks the workers to load (mesh/store/state.py `want_load`).
No registry, vmodel, copy, claim or worker key, no command or control queue: a producer cannot
register, unregister, set vmodels, place loads, send commands or control tasks.
"""

from __future__ import annotations

from mesh.protocol.keys import Keys, queue_bell


def producer_rules(keys: Keys) -> list[str]:
    p = keys.kombu_prefix
    model_queues = keys.model_queue_pattern  # ids are encoded: no glob character in a queue name
    return [
        "resetkeys", "resetchannels", "-@all",
        "+@read", "+@write", "+@scripting", "+@connection", "+@transaction", "+@pubsub",
        # keyless commands that would reach every mesh's keys, or the server itself
        "-@dangerous", "-@admin", "-script|flush", "-script|kill", "-function",
        # read-only everywhere else; read-write (`~`, not `%W~`: Redis 7.0 asks both rights of
        # one pattern for every key a script declares) where it writes
        f"%R~{p}*",
        f"~{p}{model_queues}",
        f"~{p}{queue_bell(model_queues)}",
        *(f"~{b}" for b in keys.queue_bindings(model_queues)),
        f"~{keys.reply_list('*')}",
        f"~{keys.wanted}",
        f"&{p}celery-task-meta-*",  # AsyncResult.get() of Celery's own backend subscribes here
    ]  # fmt: skip


def operator_rules(keys: Keys) -> list[str]:
    """Everything under the mesh's prefix; Celery's events and remote control are pub/sub
    channels kombu names without the prefix, hence every channel."""
    return ["resetkeys", "resetchannels", "+@all", "-@admin", "-@dangerous", "+info", f"~{keys.kombu_prefix}*", "&*"]


def setuser_command(user: str, password: str, rules: list[str]) -> list[str]:
    """`ACL SETUSER` arguments (for redis-py's execute_command, or `redis-cli` with quoting)."""
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *rules]


__all__ = ["operator_rules", "producer_rules", "setuser_command"]
