"""Names of every Redis key and queue, all under one prefix (ModelMesh's `root_prefix`).

Keeping the naming in one place is what lets two meshes (or parallel tests) share a Redis:
nothing outside this module builds a key or queue name by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.protocol.ids import decode_id, encode_id, validate_prefix

# kombu's Redis transport stores priority sub-queues as `<queue>\x06\x16<priority>`.
KOMBU_PRIORITY_SEP = "\x06\x16"


# A bell outlives its last ring this long: a bell nobody waits on (its consumers are busy, or
# gone) does not stay behind. Waiting consumers pop it within milliseconds.
BELL_TTL_MS = 30_000

# Marks an id found in a queue name that decodes to none (`Keys.model_of_queue_list`).
UNDECODABLE = "\x00"

_REPLY_TOKEN = re.compile(r"[0-9a-f]{32}")


def queue_bell(queue: str) -> str:
    """The list idle consumers of `queue` block on (mesh/broker/transport.py), without kombu's
    global_keyprefix (kombu's client adds it)."""
    return f"_kombu.bell.{queue}"


# A Lua function for scripts that push onto a list any producer may write (a model queue's
# lists, its bell, the wanted list): one holding another type is deleted first, and its type
# returned (false when it was a list or nothing). Pushed onto as it was, it failed the whole
# script at that point (WRONGTYPE) with what came before it done, and every retry the same
# way: a dead worker's messages stayed held, a cutover's requests stayed put. What such a key
# held was not a queue's messages, so nothing is lost.
AS_LIST_LUA = """
local function as_list(key)
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'list' and kind ~= 'none' then
    redis.call('DEL', key)
    return kind
  end
  return false
end
"""


# The broker's own bookkeeping beside kombu's unacked hash and index (mesh/broker/transport.py),
# without kombu's global_keyprefix (kombu's client adds it; `Keys` has the prefixed names).
UNACKED = "unacked"  # kombu's Channel.unacked_key
UNACKED_INDEX = "unacked_index"  # kombu's Channel.unacked_index_key
HOLDER_OF = "_kombu.holder_of"  # hash: delivery tag -> "<holder id> <list key it was popped from>"
HOLDERS = "_kombu.holders"  # set of the holder ids that popped messages
DELIVERIES = "_kombu.deliveries"  # hash: delivery tag -> times it came back from a dead or stuck holder
DEAD_LETTERS = "_kombu.dead"  # list of dead letters (JSON), newest first


def held_set(holder: str) -> str:
    """The delivery tags a consumer process (`holder`) popped and has not acked."""
    return f"_kombu.held.{holder}"


def holder_alive(holder: str) -> str:
    """A key that exists while `holder`'s process is alive (its heartbeat TTL)."""
    return f"_kombu.alive.{holder}"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # --- queues (Celery names; kombu stores them under `kombu_prefix`). A model or vmodel id
    # enters a name only through `encode_id` and leaves it only through `decode_id`
    # (mesh/protocol/ids.py): no id can add a glob character, a separator or a second meaning.
    def model_queue(self, model_id: str) -> str:
        return f"{self.prefix}.model.{encode_id(model_id)}"

    @property
    def model_queue_pattern(self) -> str:
        """Glob of every model queue's name (ACL rules); `*` here is the glob, never an id."""
        return f"{self.prefix}.model.*"

    def worker_queue(self, worker: str) -> str:
        return f"{self.prefix}.worker.{worker}"

    def worker_from_queue(self, queue: str) -> str | None:
        """The worker whose private queue this is; None for any other queue."""
        head = f"{self.prefix}.worker."
        return (queue[len(head) :] or None) if queue.startswith(head) else None

    def model_from_queue(self, queue: str) -> str | None:
        """The model id of a model queue; None for any other queue, and for a name under
        `<prefix>.model.` that is no encoding of a valid id (a producer made it up)."""
        head = f"{self.prefix}.model."
        return decode_id(queue[len(head) :]) if queue.startswith(head) else None

    def model_queue_lists_pattern(self) -> str:
        """SCAN pattern of every model queue's Redis lists (all priority steps, any model id)."""
        return f"{self.kombu_prefix}{self.model_queue_pattern}"

    def model_of_queue_list(self, key: str) -> tuple[str, str] | None:
        """(model id, queue) of a model queue's Redis list (`queue_list_key`'s inverse). A
        producer may push to any name under `<prefix>.model.`: for one that decodes to no id,
        the id is `UNDECODABLE` + the name's tail, which no valid id can equal (ids hold no
        NUL) and `queue_of_found` turns back into the queue."""
        if not key.startswith(self.kombu_prefix):
            return None
        queue = key[len(self.kombu_prefix) :].split(KOMBU_PRIORITY_SEP, 1)[0]
        head = f"{self.prefix}.model."
        if not queue.startswith(head) or queue == head:
            return None
        model_id = decode_id(queue[len(head) :])
        return (UNDECODABLE + queue[len(head) :] if model_id is None else model_id), queue

    def queue_of_found(self, model_id: str) -> str:
        """The queue of an id as `model_of_queue_list` found it (`model_queue` for a valid id)."""
        if model_id.startswith(UNDECODABLE):
            return f"{self.prefix}.model.{model_id[len(UNDECODABLE):]}"
        return self.model_queue(model_id)

    @property
    def kombu_prefix(self) -> str:
        """kombu's `global_keyprefix` and the result backend's: every Celery key is under it."""
        return f"{self.prefix}:"

    def queue_list_keys(self, queue: str, priority_steps: list[int]) -> list[str]:
        """The Redis lists holding a queue's messages, one per priority step."""
        return [self.queue_list_key(queue, p) for p in priority_steps]

    def queue_list_key(self, queue: str, priority: int) -> str:
        """The Redis list of one priority step of a queue (kombu's `_q_for_pri`)."""
        base = self.kombu_prefix + queue
        return base if priority == 0 else f"{base}{KOMBU_PRIORITY_SEP}{priority}"

    def queue_bindings(self, queue: str) -> list[str]:
        """kombu's binding tables of a queue, which it keeps for every queue ever declared.
        Routing on the anonymous exchange never reads them, so they go with their model
        (else each model id ever used leaves two keys behind)."""
        base = f"{self.kombu_prefix}_kombu.binding"
        return [f"{base}.{queue}", f"{base}_permanent.{queue}"]

    def queue_bell(self, queue: str) -> str:
        """A queue's bell (mesh/broker/transport.py), which goes with its model like its bindings."""
        return self.kombu_prefix + queue_bell(queue)

    # --- the broker's bookkeeping of delivered messages (mesh/broker/transport.py,
    # mesh/store/failover.py)
    @property
    def unacked_index(self) -> str:
        return self.kombu_prefix + UNACKED_INDEX

    @property
    def holder_of(self) -> str:
        return self.kombu_prefix + HOLDER_OF

    @property
    def holders(self) -> str:
        return self.kombu_prefix + HOLDERS

    @property
    def deliveries(self) -> str:
        return self.kombu_prefix + DELIVERIES

    @property
    def dead_letters(self) -> str:
        return self.kombu_prefix + DEAD_LETTERS

    def held(self, holder: str) -> str:
        return self.kombu_prefix + held_set(holder)

    def holder_alive(self, holder: str) -> str:
        return self.kombu_prefix + holder_alive(holder)

    # --- replies (mesh/broker/replies.py): one list per producer process, named in the
    # messages' `reply_to`; beside the result records, under the result backend's prefix
    def reply_list(self, token: str) -> str:
        return f"{self.kombu_prefix}reply.{token}"

    def is_reply_list(self, name: object) -> bool:
        """Whether a message's `reply_to` names a reply list of this mesh. Workers push results
        only to such names: a producer cannot make a worker write to any other key (plain
        Celery producers put a uuid there, which is left alone)."""
        head = f"{self.kombu_prefix}reply."
        return isinstance(name, str) and name.startswith(head) and _REPLY_TOKEN.fullmatch(name, len(head)) is not None

    # --- control-plane state
    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def vmodels(self) -> str:
        return f"{self.prefix}:vmodels"

    def copies(self, model_id: str) -> str:
        return f"{self.prefix}:copies:{encode_id(model_id)}"

    def failures(self, model_id: str) -> str:
        return f"{self.prefix}:failures:{encode_id(model_id)}"

    def load_claim(self, model_id: str) -> str:
        return f"{self.prefix}:loadclaim:{encode_id(model_id)}"

    @property
    def signatures(self) -> str:
        """Hash model_id -> ModelSignature JSON, written by the worker that loads the model."""
        return f"{self.prefix}:signatures"

    # --- vmodel transitions (mesh/control/vmodels.py)
    @property
    def transitions(self) -> str:
        """Hash vmodel_id -> target model id, for every vmodel with a pending transition."""
        return f"{self.prefix}:transitions"

    @property
    def draining(self) -> str:
        """Hash model_id -> drain entry: auto-deleted models whose copies still finish requests."""
        return f"{self.prefix}:draining"

    def vmodel_lock(self, vmodel_id: str) -> str:
        return f"{self.prefix}:vmlock:{encode_id(vmodel_id, 'vmodel')}"

    def vmodel_dirty(self, vmodel_id: str) -> str:
        return f"{self.prefix}:vmdirty:{encode_id(vmodel_id, 'vmodel')}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_key_prefix(self) -> str:
        return f"{self.prefix}:worker:"

    def worker(self, name: str) -> str:
        return self.worker_key_prefix + name

    @property
    def wanted(self) -> str:
        """List of model ids producers ask the workers to load: the cold path of a producer
        whose Redis user may not place loads (docs/security.md)."""
        return f"{self.prefix}:wanted"

    def load_line(self, worker: str) -> str:
        """Sorted set model_id -> time the load was sent: the loads a worker has been told to do
        and has not finished (its line of loads, read live by the cold path's placement)."""
        return f"{self.prefix}:loadline:{worker}"

    # --- the beat scheduler (mesh/control/rebalance.py)
    @property
    def control_queue(self) -> str:
        """Celery queue of control-plane tasks (mesh.rebalance); every mesh worker consumes it."""
        return f"{self.prefix}.control"

    @property
    def rebalance_lock(self) -> str:
        return f"{self.prefix}:rebalance:lock"

    @property
    def rebalance_history(self) -> str:
        """Sorted set of the scheduler's recent loads/unloads (JSON), scored by time."""
        return f"{self.prefix}:rebalance:history"

    @property
    def rebalance_last(self) -> str:
        """JSON summary of the last rebalance run."""
        return f"{self.prefix}:rebalance:last"

    @property
    def usage(self) -> str:
        """Hash model_id -> usage (last use, decayed request rate) that outlives its copies."""
        return f"{self.prefix}:usage"

    @property
    def usage_stamp(self) -> str:
        """Token of the last scheduler process that wrote `usage` (its cache is current while
        the token is its own)."""
        return f"{self.prefix}:usage:stamp"

    @property
    def changes(self) -> str:
        """Stream of model ids whose record, copies or failures changed (mesh/store/changes.py):
        the scheduler re-reads only those."""
        return f"{self.prefix}:changes"

    # --- requests queued for models no longer registered (mesh/store/strays.py)
    @property
    def strays(self) -> str:
        """Hash model_id -> Redis time its queue was first seen holding requests while the
        model was not registered."""
        return f"{self.prefix}:strays"

    @property
    def strays_held(self) -> str:
        """List of the requests taken from such queues, until each is answered NOT_FOUND."""
        return f"{self.prefix}:strays:held"

    @property
    def gone(self) -> str:
        """Sorted set model_id -> time it was unregistered or auto-deleted: queues watched for
        requests put back after it went, until none can come back (mesh/store/strays.py)."""
        return f"{self.prefix}:gone"

    @property
    def strays_cursor(self) -> str:
        """Where the slow sweep's SCAN of the model queues stands."""
        return f"{self.prefix}:strays:cursor"

    @property
    def unacked(self) -> str:
        """kombu's hash of delivered, unacknowledged messages (kombu/transport/redis.py,
        `QoS.unacked_key`): each value is `[message, exchange, routing_key]` as JSON."""
        return self.kombu_prefix + UNACKED

    @property
    def strays_lock(self) -> str:
        """Held by the worker sweeping, one sweep per interval in the pool."""
        return f"{self.prefix}:strays:lock"

    # --- the model repository (mesh/control/repository.py)
    @property
    def repository_lock(self) -> str:
        """Held while a repository sync runs, so two syncs never overlap."""
        return f"{self.prefix}:repository:lock"
