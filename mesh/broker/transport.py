"""kombu's Redis transport, hardened against garbage in a queue and against losing messages.

Changes to stock kombu, nothing else:
- kombu decodes each popped list item inside the worker's event loop; an item that is not a
  JSON message envelope raises there and takes the consumer down (the worker reconnects and
  pops the next one; a queue full of garbage stalls it). Here it is logged and dropped.
- one redis client per connection pool instead of a new one per operation (see
  `conn_or_acquire`).
- kombu pops a message (BRPOP) and records it as unacked with a second command: a worker
  killed, or a Redis gone, in between loses the message. Here a message only ever leaves its
  queue through one Lua script that pops it and records it in the same atomic step
  (`POP_AND_RECORD`). An idle worker blocks on the queues' *bells* instead (`ring`): every
  publish and every requeue rings its queue's bell, a one-element list whose pop loses
  nothing. docs/reliability.md.
- kombu brings a dead consumer's unacked messages back only after its visibility timeout. The
  pop script also records which consumer process (holder) took each message, so live workers
  put a dead one's messages back as soon as its heartbeat expires (mesh/store/failover.py),
  and counts the deliveries that ended with the holder dead or stalled: past
  `mesh_max_deliveries` a message is dead-lettered instead (docs/reliability.md, "Worker death
  and failover", "Dead letters").
Celery uses it through `broker_transport` in celeryconfig.py (URLs stay `redis://`/`rediss://`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from itertools import chain
from time import monotonic, sleep, time
from typing import NamedTuple

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from mesh.broker.redis_url import FollowingConnection
from mesh.protocol.jsonwire import loads
from mesh.protocol.keys import (
    AS_LIST_LUA,
    BELL_TTL_MS,
    DEAD_LETTERS,
    DELIVERIES,
    HOLDER_OF,
    HOLDERS,
    KOMBU_PRIORITY_SEP,
    UNACKED,
    UNACKED_INDEX,
    held_set,
    holder_alive,
    queue_bell,
)

log = logging.getLogger("mesh.broker.transport")

# global_keyprefix -> messages popped but never recorded as unacked (Channel._keep_unrecorded)
_unrecorded: dict[str, list[dict]] = {}
_unrecorded_lock = threading.Lock()

# holder id -> what the worker does with a message the pop script dead-lettered (answer its
# producer); set by the worker (set_dead_letter_handler), called on the consumer thread
_dead_letter_handlers: dict[str, Callable[[dict, str], None]] = {}

_ENVELOPE_KEYS = ("body", "properties")
# kombu's Redis tags and Celery's task ids are uuids (36 characters); anything much longer is
# not from a producer of ours, and would become a Redis key or hash field as it is
MAX_TAG_CHARS = 255
BODY_ENCODINGS = (None, "base64")  # kombu's virtual Channel.codecs

# Why the transport dropped a message: the closed set of `reason` values it reports
NOT_JSON, BAD_ENVELOPE, UNDELIVERABLE = "not_json", "bad_envelope", "undeliverable"
# global_keyprefix -> hook(reason, envelope or None) that a worker sets (`on_rejected`)
_rejection_hooks: dict[str, Callable[[str, dict | None], None]] = {}


def on_rejected(prefix: str, hook: Callable[[str, dict | None], None] | None) -> None:
    """Call `hook(reason, envelope)` on the consumer thread for every message the channels of
    kombu prefix `prefix` drop (None: stop). A worker counts them and answers the ones whose
    task id is usable (workers/strategy.py `refuse_envelope`)."""
    if hook is None:
        _rejection_hooks.pop(prefix, None)
    else:
        _rejection_hooks[prefix] = hook


def usable_text(value: object, most: int = MAX_TAG_CHARS) -> bool:
    """A non-empty str of at most `most` characters that encodes as UTF-8: what may become a
    Redis key or field (redis-py encodes str strictly: a lone surrogate raises
    UnicodeEncodeError in the middle of kombu's bookkeeping, which stopped the worker)."""
    if not isinstance(value, str) or not value or len(value) > most:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional(value: object, *types: type) -> bool:
    return value is None or (isinstance(value, types) and not isinstance(value, bool))


def envelope_problem(item: object) -> str | None:
    """Why a decoded list item is not a kombu message envelope this transport can deliver
    (None when it is one). Strict on the types of every field kombu or Celery read before a
    strategy sees the message: kombu's virtual Message and QoS (kombu/transport/virtual/base.py
    `Message.__init__`, kombu/transport/redis.py `QoS.append`), Celery's dispatch by task name
    (celery/worker/consumer/consumer.py `on_task_received`) and the requeue (`_get_message_priority`)."""
    if not isinstance(item, dict):
        return f"not a message envelope (a JSON {type(item).__name__})"
    missing = [k for k in _ENVELOPE_KEYS if k not in item]
    if missing:
        return f"message envelope without {', '.join(missing)}"
    if not _optional(item["body"], str):
        return "message envelope whose body is not a string"
    for field in ("content-type", "content-encoding"):
        if not _optional(item.get(field), str):
            return f"message envelope whose {field} is not a string"
    props = item["properties"]
    if not isinstance(props, dict):
        return "message envelope whose properties are not an object"
    if not usable_text(props.get("delivery_tag")):
        return "message envelope without a usable properties.delivery_tag (a non-empty UTF-8 string)"
    if props.get("body_encoding") not in BODY_ENCODINGS:
        return "message envelope with an unknown properties.body_encoding"
    priority = props.get("priority")
    if not _optional(priority, int) or (priority is not None and not 0 <= priority <= 255):
        return "message envelope whose properties.priority is not an integer of 0-255"
    for field in ("reply_to", "correlation_id"):
        if not _optional(props.get(field), str):
            return f"message envelope whose properties.{field} is not a string"
    info = props.get("delivery_info")
    if not isinstance(info, dict):
        return "message envelope with a missing or malformed properties.delivery_info"
    for field in ("exchange", "routing_key"):  # kombu's QoS.append reads both (KeyError)
        if not isinstance(info.get(field), str):
            return f"message envelope whose properties.delivery_info.{field} is not a string"
    headers = item.get("headers", {})
    if headers is not None and not isinstance(headers, dict):
        return "message envelope with non-object headers"
    headers = headers or {}
    if "task" in headers and not usable_text(headers["task"]):
        return "message envelope whose headers.task is not a usable string"
    if "id" in headers and not usable_text(headers["id"]):
        return "message envelope whose headers.id is not a usable string (non-empty UTF-8, at most 255 characters)"
    return None


# Takes up to ARGV[3] messages off the lists KEYS[9..], first list first (BRPOP's order), and,
# in the same atomic step, records each as unacked exactly as kombu's QoS.append does (index
# KEYS[2] score: ARGV[1], the time; hash KEYS[1] value: [message, exchange, routing_key]) and,
# when the consumer has a holder id (ARGV[4]), who holds it and where it came from (hash
# KEYS[3]: tag -> "<holder> <list key>"; the holder's set KEYS[4]; the set of holders KEYS[5];
# the holder's alive key KEYS[6], set if missing, TTL ARGV[5] ms), so that live workers put it
# back at once when the holder dies (mesh/store/failover.py). A message that already came back
# ARGV[6] times (hash KEYS[7]; 0: no limit) from holders that died or stalled is not delivered
# again: it goes to the dead-letter list KEYS[8] (JSON, its list key without the prefix ARGV[7]).
# Returns a flat array of {list, message, delivery tag} triples; the tag is 1 for a dead letter.
# Messages over ARGV[2] bytes or without the fields come back unrecorded (tag ''): kombu
# records them as usual (mesh producers never send such messages); only the visibility
# timeout brings those back. Nothing to take: an empty array. A list key holding another type
# (any producer may write one) is skipped: it failed the whole script, and that error stopped
# the worker; publishes to it fail at their producer.
POP_AND_RECORD = """
local out, n, most = {}, 0, tonumber(ARGV[3])
local holder, limit, plen = ARGV[4], tonumber(ARGV[6]), #ARGV[7]
local PRIORITY_SEP = '\\6\\22'  -- kombu's `<queue>\\x06\\x16<priority>` (mesh.protocol.keys)
if holder ~= '' then
  redis.call('SET', KEYS[6], '1', 'PX', ARGV[5], 'NX')
  redis.call('SADD', KEYS[5], holder)
end
for i = 9, #KEYS do
  while n < most do
    local raw = redis.pcall('RPOP', KEYS[i])
    if type(raw) == 'table' then break end  -- not a list (any producer may write one): skipped
    if not raw then break end
    local tag = ''
    if #raw <= tonumber(ARGV[2]) then
      local ok, m = pcall(cjson.decode, raw)
      if ok and type(m) == 'table' and type(m.properties) == 'table' then
        local t = m.properties.delivery_tag
        local info = m.properties.delivery_info
        if type(t) == 'string' and t ~= '' and type(info) == 'table'
            and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
          local back = tonumber(redis.call('HGET', KEYS[7], t) or '0') or 0
          if limit > 0 and back >= limit then
            redis.call('HDEL', KEYS[7], t)
            redis.call('LPUSH', KEYS[8], '{"list":' .. cjson.encode(string.sub(KEYS[i], plen + 1)) ..
                       ',"tag":' .. cjson.encode(t) .. ',"deliveries":' .. back .. ',"time":' .. ARGV[1] ..
                       ',"reason":"delivery limit","message":' .. raw .. '}')
            tag = 1
          else
            redis.call('ZADD', KEYS[2], ARGV[1], t)
            -- recorded as coming from the queue it was popped from (the anonymous exchange
            -- routes to the queue its routing key names): a restore puts it back there, not
            -- wherever its envelope, which any producer writes, claims it was sent
            local q = string.sub(KEYS[i], plen + 1)
            local sep = string.find(q, PRIORITY_SEP, 1, true)
            if sep then q = string.sub(q, 1, sep - 1) end
            redis.call('HSET', KEYS[1], t, '[' .. raw .. ',"",' .. cjson.encode(q) .. ']')
            if holder ~= '' then
              redis.call('HSET', KEYS[3], t, holder .. ' ' .. KEYS[i])
              redis.call('SADD', KEYS[4], t)
            end
            tag = t
          end
        end
      end
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = raw
    out[#out + 1] = tag
    n = n + 1
  end
  if n >= most then break end
end
return out
"""
DEAD_LETTERED = 1  # the pop script's tag for a message it moved to the dead-letter list


def pop_keys_args(prefix: str, lists: list[str], *, now: float, most: int, holder: str = "",
                  holder_ttl_ms: int = 6000, max_deliveries: int = 0,
                  max_bytes: int | None = None) -> tuple[list[str], list]:  # fmt: skip
    """POP_AND_RECORD's keys and arguments: `lists` (prefixed) in the order to take from."""
    return pop_keys(prefix, lists, holder), pop_args(prefix, now=now, most=most, holder=holder,
                                                     holder_ttl_ms=holder_ttl_ms, max_deliveries=max_deliveries,
                                                     max_bytes=max_bytes)  # fmt: skip


def pop_keys(prefix: str, lists: list[str], holder: str = "") -> list[str]:
    """POP_AND_RECORD's keys (the same for every poll of one set of queues)."""
    return [prefix + UNACKED, prefix + UNACKED_INDEX, prefix + HOLDER_OF, prefix + held_set(holder),
            prefix + HOLDERS, prefix + holder_alive(holder), prefix + DELIVERIES, prefix + DEAD_LETTERS,
            *lists]  # fmt: skip


def pop_args(prefix: str, *, now: float, most: int, holder: str = "", holder_ttl_ms: int = 6000,
             max_deliveries: int = 0, max_bytes: int | None = None) -> list:
    """POP_AND_RECORD's arguments (the time and the room change from poll to poll)."""
    return [repr(now), SCRIPT_RECORD_MAX_BYTES if max_bytes is None else max_bytes, most, holder,
            holder_ttl_ms, max_deliveries, prefix]  # fmt: skip


SCRIPT_RECORD_MAX_BYTES = 4 * 1024 * 1024  # bigger ones are not decoded inside Redis
# Messages one poll takes at most (fewer when the prefetch limit leaves less room): under load
# one round trip brings a batch's worth instead of one message.
POP_MAX = 16
WAIT_AND_POP = "BRPOP+EVALSHA"  # an idle consumer's poll: the wait on the bells, the script behind it
POLL_CHUNKS_MAX = 1024  # orders of queues whose packed keys a channel keeps (rebuilt from empty past that)


def bulk(value: str | bytes | int | float) -> bytes:
    """`value` as a RESP bulk string, encoded as redis-py encodes a command's arguments."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif isinstance(value, float):
        value = repr(value).encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def wait_packet(bells: list[bytes], timeout: float) -> bytes:
    """BRPOP on `bells` (bulk strings, `bulk`) with `timeout`, packed."""
    return b"".join([b"*%d\r\n$5\r\nBRPOP\r\n" % (len(bells) + 2), *bells, bulk(timeout)])


def _raw_tag(item: bytes) -> bytes | None:
    """The delivery tag of a list item as the pop script recorded it, byte for byte (invalid
    UTF-8 included); None when it has none."""
    try:
        raw = item.decode("utf-8", "surrogateescape") if isinstance(item, bytes) else item
        tag = loads(raw)["properties"]["delivery_tag"]
        return tag.encode("utf-8", "surrogateescape") if isinstance(tag, str) else None
    except Exception:
        return None


# A queue's bell rung: a list of at most one element, its TTL renewed. A bell that is not a
# list (any producer may write one) is replaced: the commands alone failed on it, after the
# message was on its queue, and the publish raised for a message that would be served.
RING = AS_LIST_LUA + """
as_list(KEYS[1])
redis.call('LPUSH', KEYS[1], 1)
redis.call('LTRIM', KEYS[1], 0, 0)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""


def ring(pipe, queue: str, prefix: str) -> None:
    """Queue the command on a kombu (prefixed) pipeline that rings `queue`'s bell, which idle
    consumers block on with BRPOP (see Channel). EVAL, not EVALSHA: a pipeline cannot load a
    script it finds missing, and Redis keeps what EVAL compiled."""
    pipe.execute_command("EVAL", RING, 1, prefix + queue_bell(queue), BELL_TTL_MS)  # kombu prefixes no EVAL


def set_dead_letter_handler(holder: str, handler: Callable[[dict, str], None] | None) -> None:
    """What the consumer of `holder` does with each message the pop script moved to the
    dead-letter list: handler(message envelope, queue). None: only log it."""
    if handler is None:
        _dead_letter_handlers.pop(holder, None)
    else:
        _dead_letter_handlers[holder] = handler


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, keeping the holder record and the delivery counter of
    the pop script (POP_AND_RECORD) in step: every path that takes a message out of the
    unacked hash (ack, reject, restore) takes it out of the holder record too, and an ack or a
    reject forgets its delivery count (a restore keeps it)."""

    _sweeping = False  # inside restore_visible: restores count as deliveries that failed

    def append(self, message, delivery_tag):
        if delivery_tag == self.channel._recorded_tag:  # the pop script recorded it already
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        # kombu's, plus the holder record (kombu/transport/redis.py QoS._remove_from_indices,
        # which ack, reject and restore_by_tag all go through). The tag leaves our own holder
        # set; when another process held it (a sweep restoring a stuck holder's message), its
        # set keeps a stale tag that the failover script skips (the holder_of hash decides).
        with self.pipe_or_acquire(pipe) as pipe:
            super()._remove_from_indices(delivery_tag, pipe)
            pipe.hdel(HOLDER_OF, delivery_tag)
            holder = self.channel.mesh_holder
            if holder:
                pipe.srem(held_set(holder), delivery_tag)
            return pipe

    def _acked(self, delivery_tag, pipe=None):
        """The Redis half of an ack: out of every index, and its delivery count forgotten."""
        pipe = self._remove_from_indices(delivery_tag, pipe)
        return pipe.hdel(DELIVERIES, delivery_tag)  # kombu's pipeline prefixes HDEL

    def ack(self, delivery_tag):
        self._acked(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if requeue:  # a live worker hands it back: not a failed delivery, the count stays
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._acked(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args, **kwargs):
        # the visibility sweep (kombu's): what it restores was held past the visibility
        # timeout by a worker that died or is stuck, a failed delivery (`_do_restore_message`)
        self._sweeping = True
        try:
            return super().restore_visible(*args, **kwargs)
        finally:
            self._sweeping = False


class Channel(kombu_redis.Channel):
    QoS = QoS
    # mesh_holder: this consumer process's holder id (set by the mesh worker, empty for other
    # processes: then no holder record, only the visibility timeout); mesh_holder_ttl_ms: the
    # TTL its alive key gets from the pop script when missing; mesh_max_deliveries: failed
    # deliveries after which a message is dead-lettered (0: never)
    from_transport_options = kombu_redis.Channel.from_transport_options + (
        "mesh_holder", "mesh_holder_ttl_ms", "mesh_max_deliveries",
    )  # fmt: skip
    mesh_holder = ""
    mesh_holder_ttl_ms = 6000
    mesh_max_deliveries = 0

    @contextmanager
    def conn_or_acquire(self, client=None):
        """kombu builds a new redis.Redis for every QoS append, ack and publish, and each
        construction rebuilds redis-py's ~165-entry response-callback table: measured at
        ~3.4 constructions per message and ~10% of a worker's consumer-thread CPU
        (kombu/transport/redis.py `Channel._create_client`, redis/redis-py#3624). A client only
        borrows connections from the pool per command, so one per pool is safe to share; a new pool (reconnect) gets a new one.
        """
        if client:
            yield client
            return
        if self._pool is None and getattr(self.connection, "client", None) is None:
            # closing after the connection was detached (a reconnect): kombu would raise an
            # AttributeError here and Celery stops the worker ("Unrecoverable error"); as a
            # connection error it is ignored, and unacked messages return after the
            # visibility timeout (the fault suite's Redis restart found this)
            raise kombu_redis.redis.ConnectionError("the broker connection is closed")
        pool = self.pool
        cached = self.__dict__.get("_mesh_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_mesh_client"] = cached
        yield cached[1]

    # Consuming, with no moment where a message is neither in its queue nor recorded as
    # unacked. Stock kombu BRPOPs the queues and records the message with a second command; a
    # SIGKILL between the two lost it (1 of 800 requests in a CI run). Here:
    # - busy (the last poll found messages, or a wait timed out): the pop script takes up to
    #   POP_MAX messages and records them atomically, one round trip (kombu: two per message);
    # - idle: BRPOP on the queues' bells, which every publish and requeue ring (`_put`,
    #   `_do_restore_message`), and the pop script sent in the same write behind it. Redis
    #   runs a blocked client's next command as soon as its BRPOP returns, so a rung bell's
    #   messages come back in the same round trip, taken and recorded by the script (sent after
    #   the bell's reply, the script cost a second round trip on every idle delivery: ~250 us
    #   of a 2 ms request, closedloop svc1). Popping a bell loses nothing; it only says "take
    #   now". A wait that times out (`polling_interval`) has polled with the script all the
    #   same, for messages pushed by a producer without this transport. The script's `now`
    #   (the unacked record's score, which the visibility timeout counts from) is then the
    #   wait's start: at most one polling interval early.
    _busy = True  # poll with the script alone next, rather than wait for a bell
    _sent: str | None = None  # the poll in flight: "EVALSHA", or WAIT_AND_POP (BRPOP, then EVALSHA)
    _recorded_tag: str | None = None  # delivered now, already recorded by the script
    _pop_sha: str | None = None
    _pop_most = POP_MAX  # what the last pop script call could take
    _polled: list[str] = []  # the queues of the last poll

    def _brpop_start(self, timeout=None):
        if _unrecorded.get(self.global_keyprefix):
            self._restore_unrecorded()
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        keys, bells = self._poll_chunks(queues)
        pop = self._pop_packet(keys)
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        self._polled = queues
        if self._busy:
            self._sent = "EVALSHA"
            connection.send_packed_command([pop])
            return
        timeout = self.brpop_timeout if timeout is None else timeout
        self._sent = WAIT_AND_POP
        connection.send_packed_command([wait_packet(bells, timeout or 0) + pop])

    def _poll_chunks(self, queues: list[str]) -> tuple[list[bytes], list[bytes]]:
        """The pop script's keys and the bells of `queues` as RESP bulk strings, in `queues`'
        order (which the queue cycle rotates: every queue is taken from first in turn).

        Why: redis-py encodes and packs every argument of a command in Python, and a poll has
        ~4 per queue consumed: ~65 us for 20 queues, against ~5 us joined from chunks. On
        closedloop zipf, whose workers consume a queue per model, starting a poll went from
        6.7 % to 3.2 % of a worker's CPU samples (py-spy; docs/benchmarks.md). Each order of a
        set of queues is joined once from each queue's chunks (built once per queue). There,
        a worker's set of queues changes with every load (~80 a second), each set comes in as
        many orders as it has queues, and so nearly every poll is a new order: joining must be
        cheap too (`_join_chunks`)."""
        polls = self.__dict__.get("_mesh_polls")
        if polls is None or len(polls) > POLL_CHUNKS_MAX:  # queues come and go with their models
            polls = self.__dict__["_mesh_polls"] = {}
        order = tuple(queues)
        built = polls.get(order)
        if built is None:
            built = polls[order] = self._join_chunks(queues)
        return built

    def _join_chunks(self, queues: list[str]) -> tuple[list[bytes], list[bytes]]:
        chunks = self.__dict__.get("_mesh_queue_chunks")
        if chunks is None or len(chunks) > POLL_CHUNKS_MAX:
            chunks = self.__dict__["_mesh_queue_chunks"] = {}
        holder = self.mesh_holder or ""
        fixed = self.__dict__.get("_mesh_fixed_keys")
        if fixed is None or fixed[0] != holder:  # the same for every poll (of one holder)
            fixed = self.__dict__["_mesh_fixed_keys"] = (
                holder, [bulk(k) for k in pop_keys(self.global_keyprefix, [], holder)])
        mine = [chunks.get(q) or self._queue_chunks(chunks, q) for q in queues]
        # the lists step by step (every queue's first step, then every queue's second...):
        # zip transposes the queues' per-step chunks without a loop in Python
        lists = chain.from_iterable(zip(*[m[0] for m in mine]))
        return [*fixed[1], *lists], [m[1] for m in mine]

    def _queue_chunks(self, chunks: dict, queue: str) -> tuple[tuple[bytes, ...], bytes]:
        p = self.global_keyprefix
        mine = chunks[queue] = (tuple(bulk(p + self._q_for_pri(queue, pri)) for pri in self.priority_steps),
                                bulk(p + queue_bell(queue)))  # fmt: skip
        return mine

    def _pop_packet(self, keys: list[bytes]) -> bytes:
        """The pop script's call (EVALSHA) on `keys` (from `_poll_chunks`), packed."""
        if self._pop_sha is None:
            with self.conn_or_acquire() as client:
                self._pop_sha = client.script_load(POP_AND_RECORD)
        room = self.qos.can_consume_max_estimate()
        most = POP_MAX if room is None else max(1, min(POP_MAX, room))
        self._pop_most = most
        args = pop_args(self.global_keyprefix, now=time(), most=most, holder=self.mesh_holder or "",
                        holder_ttl_ms=int(self.mesh_holder_ttl_ms), max_deliveries=int(self.mesh_max_deliveries))
        return b"".join([b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)), bulk(self._pop_sha),
                         bulk(len(keys)), *keys, *map(bulk, args)])  # fmt: skip

    def _brpop_read(self, **options):
        # kombu 5.7.0's _brpop_read, reading the pop script's or the bell wait's reply, with
        # the decode guarded (keep in step when upgrading)
        sent, self._sent = self._sent, None
        wait_error: Exception | None = None
        try:
            try:
                connection = self.client.connection
                if sent == WAIT_AND_POP:
                    # the bell's reply (or the wait's timeout), then the script's, which Redis
                    # ran right after it: both read, so the connection is in step for the next
                    try:
                        self.client.parse_response(connection, "BRPOP", **options)
                    except kombu_redis.redis.exceptions.ResponseError as exc:
                        wait_error = exc  # the script ran all the same: its messages come first
                reply = self.client.parse_response(connection, "EVALSHA", **options)
                if wait_error is not None and self._repair_bells(wait_error):
                    wait_error = None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except kombu_redis.redis.exceptions.NoScriptError:  # Redis restarted or was emptied
                self._pop_sha = None
                self._busy = True  # the next poll loads the script and takes with it at once
                raise kombu_redis.Empty() from None
            if not reply:
                self._busy = False
                if wait_error is not None:
                    raise wait_error
                raise kombu_redis.Empty()
            # Fewer than it could take: the script found every queue empty, so the next poll
            # waits on the bells (a message pushed since rang one). Polling again found nothing
            # once per request at one client: a round trip and a loop turn of the consumer
            # thread each (closedloop svc1).
            self._busy = len(reply) >= 3 * self._pop_most
            popped = [(reply[i], reply[i + 1], bytes_to_str(reply[i + 2]) or None) for i in range(0, len(reply), 3)]
            for n, (key, item, recorded) in enumerate(popped):
                if recorded == DEAD_LETTERED:
                    self._dead_lettered(key, item)
                    continue
                try:
                    self._take(key, item, recorded)
                except self.connection_errors:
                    for _key, rest, tag in popped[n + 1 :]:
                        if tag is None:  # recorded ones come back after the visibility timeout
                            self._keep_unrecorded_raw(rest)
                    raise
            if wait_error is not None:  # not a broken bell: raised as before, nothing popped is left behind
                raise wait_error
            return True
        finally:
            self._in_poll = None
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)
            if flush_reauth is not None:
                flush_reauth()

    def _repair_bells(self, error: Exception) -> bool:
        """The wait on the bells failed (`error`): delete the bells of this poll that are not
        lists, and say whether there were any. Any producer may write a queue's bell, and a
        wrong type made every wait fail, which stopped the worker; a ring recreates a bell."""
        if not self._polled:
            return False
        bells = [(self.global_keyprefix + queue_bell(queue)).encode("utf-8") for queue in self._polled]
        broken = self._delete_unless(bells, "list")
        for bell in broken:
            log.error("deleted the bell %s: it was not a list, and the wait on it failed (%s)",
                      bytes_to_str(bell), error)  # fmt: skip
        return bool(broken)

    def _take(self, key: bytes, item: bytes, recorded: str | None) -> None:
        """Deliver one popped message to its consumer, or drop it with the reason. Nothing a
        message holds may escape from here but a connection error: an exception out of the
        event loop is "Unrecoverable error" for Celery, and the worker stops (issue 21)."""
        dest = bytes_to_str(key)[len(self.global_keyprefix) :].rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        message: object = None
        try:
            # strictly: kombu's bytes_to_str replaces invalid UTF-8, and the tag the pop script
            # recorded (raw bytes, which Lua's cjson lets through) would then never be acked
            text = item.decode("utf-8") if isinstance(item, bytes) else item
            message = loads(text)
        except Exception as exc:  # ValueError, UnicodeDecodeError, RecursionError (deep nesting), ...
            reason, problem = NOT_JSON, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            reason, problem = BAD_ENVELOPE, envelope_problem(message)
        if problem is not None:
            log.error("dropped a malformed message from queue %s: %s; first bytes: %r",
                      dest, problem, bytes(item[:80]))  # fmt: skip
            if recorded is not None:  # the script recorded it: forget it, or it comes back
                self.qos._acked(_raw_tag(item) or recorded).execute()
            self._report(reason, message if isinstance(message, dict) else None)
            return
        assert isinstance(message, dict)
        # the queue it came from, not where its envelope (any producer's word) says it was
        # sent: strategies check it (control tasks act only from their own queue) and a
        # requeue sends it back there, as the pop script's unacked record does
        props = message["properties"]
        props["delivery_info"] = {**props["delivery_info"], "exchange": "", "routing_key": dest}
        self._recorded_tag = recorded
        try:
            self.connection._deliver(message, dest)
        except Exception as exc:
            # kombu counts KeyError among the Redis transport's connection errors: from a
            # delivery it means a field missing from this message, not a lost connection
            if isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError):
                if recorded is None:
                    self._keep_unrecorded(message)
                raise
            # kombu's Message or QoS, Celery's dispatch or a strategy raised on this message:
            # it is dropped (a requeue would bring it back forever), the worker carries on
            log.error("dropped a message from queue %s that could not be delivered: %s: %s",
                      dest, type(exc).__name__, str(exc)[:200])  # fmt: skip
            log.debug("delivery failure", exc_info=True)
            self._drop_delivered(message["properties"]["delivery_tag"], recorded)
            self._report(UNDELIVERABLE, message)
        finally:
            self._recorded_tag = None

    def _drop_delivered(self, tag: str, recorded: str | None) -> None:
        """Forget a message whose delivery failed, wherever it got to: kombu's QoS (in the
        unacked index and hash, and in the channel's delivered), or only the pop script's record."""
        if tag in self.qos._delivered:
            self.qos.reject(tag, requeue=False)  # kombu: remove from the indices, then ack locally
        elif recorded is not None:
            self.qos._acked(recorded).execute()

    def _report(self, reason: str, envelope: dict | None) -> None:
        hook = _rejection_hooks.get(self.global_keyprefix)
        if hook is None:
            return
        try:
            hook(reason, envelope)
        except Exception as exc:  # counting or answering a dropped message must not stop the loop
            log.error("could not report a dropped message: %s: %s", type(exc).__name__, str(exc)[:200])

    def _dead_lettered(self, key: bytes, item: bytes) -> None:
        """A message the pop script moved to the dead-letter list instead of delivering it:
        the worker answers its producer (set_dead_letter_handler)."""
        queue = bytes_to_str(key)[len(self.global_keyprefix) :].split(KOMBU_PRIORITY_SEP, 1)[0]
        try:
            message = loads(bytes_to_str(item))
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
            message = None
        log.error("dead-lettered a message of queue %s: delivered %d times without an ack "
                  "(its holders died or stalled); `mesh dead-letters list` shows it",
                  queue, self.mesh_max_deliveries)  # fmt: skip
        handler = _dead_letter_handlers.get(self.mesh_holder or "")
        if handler is None or not isinstance(message, dict):
            return
        try:
            handler(message, queue)
        except Exception:  # answering is best effort: the dead letter is kept either way
            log.exception("could not answer the producer of a dead-lettered message")

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        """kombu's binding write, after deleting binding tables of the wrong type.

        Any producer may write the binding tables of model queues (a plain `send_task`
        declares them). One that is not a set failed the declare with WRONGTYPE, and with it
        the worker's start of consuming the queue: the model was announced LOADED and its
        requests waited forever (found probing producer-writable keys, 2026-12-07). Routing on
        the anonymous exchange never reads the tables, so the declare may simply write them
        afresh."""
        try:
            return super()._queue_bind(exchange, routing_key, pattern, queue)
        except kombu_redis.redis.ResponseError as exc:
            # a pipeline's error names the command before Redis's own words
            if "WRONGTYPE" not in str(exc) or not self._repair_tables(exchange, exc):
                raise
        return super()._queue_bind(exchange, routing_key, pattern, queue)

    def _delete_unless(self, keys: list[bytes], kind: str) -> list[bytes]:
        """Delete those of `keys` (prefixed) that hold another type than `kind`; return them."""
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.execute_command("TYPE", key)  # kombu's client prefixes neither TYPE nor UNLINK
                found = pipe.execute()
            broken = [key for key, got in zip(keys, found) if bytes_to_str(got) not in (kind, "none")]
            if broken:
                client.execute_command("UNLINK", *broken)
        return broken

    def _repair_tables(self, exchange: str, error: Exception) -> bool:
        """Delete `exchange`'s binding tables that are not sets; say whether there were any."""
        tables = [(self.global_keyprefix + fmt % (exchange,)).encode("utf-8")
                  for fmt in (self.keyprefix_queue, self.keyprefix_binding_permanent)]  # fmt: skip
        broken = self._delete_unless(tables, "set")
        for table in broken:
            log.error("deleted the binding table %s: it was not a set, and declaring its queue failed (%s)",
                      bytes_to_str(table), error)  # fmt: skip
        return bool(broken)

    def _put(self, queue, message, **kwargs):
        """kombu's publish (LPUSH), ringing the queue's bell in the same round trip."""
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            pipe = _BatchCommands(batch)
            pipe.lpush(key, dumps(message))
            self._expire_queue(pipe, queue)
            ring(pipe, queue, self.global_keyprefix)
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, dumps(message))
            self._expire_queue(pipe, queue)
            ring(pipe, queue, self.global_keyprefix)
            pipe.execute()

    def _expire_queue(self, pipe, queue) -> None:
        # kombu's x-expires support, as in its _put
        if self._expires and queue in self._expires:
            for pri in self.priority_steps:
                pipe.pexpire(self._q_for_pri(queue, pri), self._expires[queue])

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        """kombu's requeue (a reject, the visibility-timeout sweep, a put-back), ringing the
        bells of the queues it pushes to so idle consumers take the message at once. A
        restore by the visibility sweep counts as a failed delivery (the pop script
        dead-letters a message after mesh_max_deliveries of them)."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if self.qos._sweeping:
            tag = (payload.get("properties") or {}).get("delivery_tag") if isinstance(payload, dict) else None
            if isinstance(tag, str):
                # kombu's prefixing pipeline leaves HINCRBY alone: the key goes prefixed
                pipe.execute_command("HINCRBY", self.global_keyprefix + DELIVERIES, tag, 1)
        try:
            queues = self._lookup(exchange, routing_key)
        except kombu_redis.InconsistencyError:
            return  # kombu logged why it could not route the message; nothing was pushed
        for queue in queues:
            ring(pipe, queue, self.global_keyprefix)

    def _delete(self, queue, *args, **kwargs):
        super()._delete(queue, *args, **kwargs)
        with self.conn_or_acquire(client=kwargs.get("client")) as client:
            client.delete(queue_bell(queue))

    def _purge(self, queue):
        with self.conn_or_acquire() as client:
            client.delete(queue_bell(queue))
        return super()._purge(queue)

    # A message too big for the pop script is recorded by kombu with a second command: if
    # Redis goes away in between (a restart, a dropped connection), stock kombu loses it. It
    # is kept here, in the process, and put back at the head of its queue as soon as Redis
    # answers again (the fault suite's Redis restart found this, before the pop script).
    def _keep_unrecorded(self, message: dict) -> None:
        tag = message["properties"]["delivery_tag"]
        if tag in self.qos._delivered:
            return  # recorded as unacked: the visibility timeout brings it back
        with _unrecorded_lock:
            _unrecorded.setdefault(self.global_keyprefix, []).append(message)
        log.warning("Redis went away between popping message %s and recording it; "
                    "it goes back to its queue on reconnection", tag)

    def _keep_unrecorded_raw(self, item: bytes) -> None:
        try:
            message = loads(bytes_to_str(item))
        except Exception:  # garbage (even nested too deep to decode): it would have been dropped anyway
            return
        if envelope_problem(message) is None:
            self._keep_unrecorded(message)

    def _restore_unrecorded(self) -> None:
        with _unrecorded_lock:
            messages = _unrecorded.pop(self.global_keyprefix, [])
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                for m in messages:
                    info = m["properties"].get("delivery_info") or {}
                    self._do_restore_message(m, info.get("exchange", ""), info.get("routing_key"), pipe)
                pipe.execute()
        except Exception:
            with _unrecorded_lock:
                _unrecorded.setdefault(self.global_keyprefix, [])[:0] = messages
            raise
        log.info("put %d message(s) popped before a Redis outage back on their queues", len(messages))


def ack_many(messages: list) -> None:
    """Ack delivered messages in one Redis round trip per channel instead of one each.

    kombu's Redis ack emulation removes each acked message from its unacked index with its own
    pipeline (ZREM + HDEL); a batch's acks share one here. Consumer thread only (kombu
    channels belong to it). Messages of other transports are acked one by one.
    """
    channels: dict[int, tuple[object, list]] = {}
    for m in messages:
        if not m.acknowledged:
            channels.setdefault(id(m.channel), (m.channel, []))[1].append(m)
    for channel, msgs in channels.values():
        qos = getattr(channel, "qos", None)
        if not isinstance(qos, kombu_redis.QoS):
            for m in msgs:
                m.ack()
            continue
        acked = qos._acked if isinstance(qos, QoS) else qos._remove_from_indices
        with qos.pipe_or_acquire() as pipe:
            for m in msgs:
                acked(m.delivery_tag, pipe)
            pipe.execute()
        forget_acked(msgs)  # Redis is done above


def ack_in(pipe, messages: list, server: tuple | None) -> list:
    """Add the Redis half of acking `messages` to `pipe` (a plain redis-py pipeline on
    `server`, e.g. the result backend's, whose keys carry no kombu prefix); returns the
    messages added. The caller runs `forget_acked` on them, on the consumer thread, once the
    pipeline has run.

    Why: a batch's results and its acks then take one round trip on the results thread
    instead of a second one on the consumer thread. Only messages of this transport whose
    broker is the same Redis server and database as `server` are added; the rest are left
    for `ack_many`. Any thread: this reads the messages' channels, it does not change them.
    """
    if server is None:
        return []
    added = []
    keys: dict[int, _AckKeys | None] = {}  # per channel
    tags: dict[_AckKeys, list] = {}
    for m in messages:
        if m.acknowledged:
            continue
        channel = m.channel
        if id(channel) not in keys:
            keys[id(channel)] = _unacked_keys(channel, server)
        k = keys[id(channel)]
        if k is None:
            continue
        tags.setdefault(k, []).append(m.delivery_tag)
        added.append(m)
    # one variadic command per key and batch, not one per message: the same writes, a
    # fifth of the commands for a batch of 8
    for k, batch in tags.items():
        pipe.zrem(k.index, *batch)
        pipe.hdel(k.unacked, *batch)
        if k.holder_of is not None:  # as QoS._acked: the holder record and the count too
            pipe.hdel(k.holder_of, *batch)
            pipe.hdel(k.deliveries, *batch)
            if k.held is not None:
                pipe.srem(k.held, *batch)
    return added


class _AckKeys(NamedTuple):
    index: str
    unacked: str
    holder_of: str | None = None  # None: a channel of stock kombu's transport
    deliveries: str | None = None
    held: str | None = None


def _unacked_keys(channel, server: tuple) -> _AckKeys | None:
    """What acking a message of a Redis channel writes (prefixed keys), if its broker is
    `server`."""
    qos = getattr(channel, "qos", None)
    # the channel's own client, if it has one: reading `channel.client` would create it
    client = vars(channel).get("client") if hasattr(channel, "__dict__") else None
    if not isinstance(qos, kombu_redis.QoS) or redis_server(client) != server:
        return None
    p = getattr(channel, "global_keyprefix", "") or ""
    if not isinstance(qos, QoS):
        return _AckKeys(p + qos.unacked_index_key, p + qos.unacked_key)
    holder = getattr(channel, "mesh_holder", "")
    return _AckKeys(p + qos.unacked_index_key, p + qos.unacked_key, p + HOLDER_OF, p + DELIVERIES,
                    p + held_set(holder) if holder else None)  # fmt: skip


def forget_acked(messages: list) -> None:
    """The local half of an ack whose Redis half `ack_in` did. Consumer thread only."""
    for m in messages:
        if not m.acknowledged:
            virtual.QoS.ack(m.channel.qos, m.delivery_tag)
            m._state = "ACK"


def redis_server(client) -> tuple | None:
    """((host, port), db) or (unix socket path, db) of a redis-py client; None if unknown."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not kwargs:
        return None
    service = getattr(client.connection_pool, "service_name", None)
    # a Sentinel-managed pool has no address: the master it follows stands for it
    where = kwargs.get("path") or (("sentinel", service) if service else (kwargs.get("host"), kwargs.get("port")))
    return (where, int(kwargs.get("db") or 0))


class _BatchCommands:
    """A pipeline look-alike that adds commands to kombu's PublishBatch instead."""

    def __init__(self, batch) -> None:
        self._batch = batch

    def __getattr__(self, name: str):
        return lambda *args: self._batch.add(name, *args)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above on a Sentinel-managed master: kombu's SentinelChannel gives the pool
    (every new connection asks the sentinels which server is the master, kombu/transport/redis.py
    `SentinelChannel._sentinel_managed_pool`), everything else is this module's. After a
    failover the consumer reconnects (Celery's connection retry) to the new master, where the
    pop script is not loaded yet: NOSCRIPT is handled like a Redis restart (`_pop_now`)."""

    from_transport_options = Channel.from_transport_options + (
        "master_name", "min_other_sentinels", "sentinel_kwargs", "sentinel_fanout_compat",
    )  # fmt: skip
    # No retries on these connections (kombu gives none): the consumer's poll connection is
    # registered with Celery's event loop by its socket, so one that reconnected by itself
    # inside a retry would leave the loop waiting on the dead socket forever (measured: a
    # worker that never served again). A broken connection must raise, and Celery rebuilds
    # the channel (its reconnection rounds: 2, 4, 6 s apart).
    connection_class = FollowingConnection

    def _get_pool(self, asynchronous=False):
        # the pop script's SHA was loaded on the old master: load it again on the new pool's
        self._pop_sha = None
        return kombu_redis.SentinelChannel._get_pool(self, asynchronous)



# How long a (re)connection of the broker waits for the sentinels to name a reachable master.
MASTER_WAIT_S = 10.0
MASTER_POLL_S = 0.25


class SentinelTransport(Transport):
    """`broker_transport` for sentinel:// URLs (mesh/broker/celery_options.py).

    A worker's consumer reconnects in Celery's rounds, 2, 4, 6 s apart (kombu
    `Connection.ensure_connection` defaults, which Celery does not expose): a round that came
    while the sentinels still named the dead master, or none, cost the next interval (a
    first answer 12 s after the kill, measured). Here one attempt keeps asking for up to
    MASTER_WAIT_S, before any channel is registered with the event loop, so the consumer is
    back as soon as the replica is promoted."""

    default_port = 26379
    Channel = SentinelChannel

    def establish_connection(self):
        deadline = monotonic() + MASTER_WAIT_S
        while True:
            try:
                return super().establish_connection()
            except (kombu_redis.redis.ConnectionError, kombu_redis.redis.TimeoutError) as exc:
                if monotonic() >= deadline:
                    raise
                log.info("waiting for the sentinels to name a reachable master: %s", exc)
                sleep(MASTER_POLL_S)
