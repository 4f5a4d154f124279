"""kombu's Redis transport, hardened against garbage in a queue.

Two changes to stock kombu, nothing else:
- kombu decodes each popped list item inside the worker's event loop; an item that is not a
  JSON message envelope raises there and takes the consumer down (the worker reconnects and
  pops the next one; a queue full of garbage stalls it). Here it is logged and dropped.
- one redis client per connection pool instead of a new one per operation (see
  `conn_or_acquire`).
Celery uses it through `broker_transport` in celeryconfig.py (URLs stay `redis://`/`rediss://`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger("mesh.transport")

# global_keyprefix -> messages popped but never recorded as unacked (Channel._keep_unrecorded)
_unrecorded: dict[str, list[dict]] = {}
_unrecorded_lock = threading.Lock()

_ENVELOPE_KEYS = ("body", "properties")


def envelope_problem(item: object) -> str | None:
    """Why a decoded list item is not a kombu message envelope (None when it is one)."""
    if not isinstance(item, dict):
        return f"not a message envelope (a JSON {type(item).__name__})"
    missing = [k for k in _ENVELOPE_KEYS if k not in item]
    if missing:
        return f"message envelope without {', '.join(missing)}"
    props = item["properties"]
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), (str, int)):
        return "message envelope without properties.delivery_tag"
    if not isinstance(props.get("delivery_info", {}), dict):
        return "message envelope with a malformed properties.delivery_info"
    if "headers" in item and not isinstance(item["headers"], dict):
        return "message envelope with non-object headers"
    return None


class Channel(kombu_redis.Channel):
    @contextmanager
    def conn_or_acquire(self, client=None):
        """kombu builds a new redis.Redis for every QoS append, ack and publish, and each
        construction rebuilds redis-py's ~165-entry response-callback table: measured at
        ~3.4 constructions per message and ~10% of a worker's consumer-thread CPU
        (reference/celery.md §7, redis-py#3624). A client only borrows connections from the
        pool per command, so one per pool is safe to share; a new pool (reconnect) gets a new one.
        """
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_mesh_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_mesh_client"] = cached
        yield cached[1]

    def _brpop_read(self, **options):
        # kombu 5.7.0's _brpop_read with the decode guarded (keep in step when upgrading)
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                try:
                    message = loads(bytes_to_str(item))
                    problem = envelope_problem(message)
                except (ValueError, TypeError, UnicodeDecodeError) as exc:
                    message, problem = None, f"not JSON ({exc})"
                if problem is not None:
                    log.error("dropped a malformed message from queue %s: %s; first bytes: %r",
                              dest, problem, bytes(item[:80]))
                    return True
                try:
                    self.connection._deliver(message, dest)
                except self.connection_errors:
                    self._keep_unrecorded(message)
                    raise
                return True
            raise kombu_redis.Empty()
        finally:
            self._in_poll = None

    # BRPOP removes a message from its queue and kombu records it as unacked with a second
    # command: if Redis goes away in between (a restart, a dropped connection), stock kombu
    # loses the message. It is kept here, in the process, and put back at the head of its
    # queue as soon as Redis answers again (the fault suite's Redis restart found this).
    def _keep_unrecorded(self, message: dict) -> None:
        tag = message["properties"]["delivery_tag"]
        if tag in self.qos._delivered:
            return  # recorded as unacked: the visibility timeout brings it back
        with _unrecorded_lock:
            _unrecorded.setdefault(self.global_keyprefix, []).append(message)
        log.warning("Redis went away between popping message %s and recording it; "
                    "it goes back to its queue on reconnection", tag)

    def _brpop_start(self, timeout=None):
        if _unrecorded.get(self.global_keyprefix):
            self._restore_unrecorded()
        return super()._brpop_start(timeout)

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
        with qos.pipe_or_acquire() as pipe:
            for m in msgs:
                qos._remove_from_indices(m.delivery_tag, pipe)
            pipe.execute()
        for m in msgs:
            virtual.QoS.ack(qos, m.delivery_tag)  # forget it locally; Redis is done above
            m._state = "ACK"


class Transport(kombu_redis.Transport):
    Channel = Channel
