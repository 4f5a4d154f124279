"""A pipeline for the results path: commands packed by hiredis, sent and read in one go.

Every answered batch stores its results, acks its messages and pushes its replies in one round
trip: ~9 commands for a lone request (SET, PUBLISH, the ack's ZREM, HDELs and SREM, RPUSH,
EXPIRE). redis-py's `Pipeline` spends more Python on them than the round trip takes (a command
stack, each argument encoded in Python, each reply through its callbacks): 126-134 us against
81-82 us packed here (in-process, loopback Redis, the commands of one request). Replies come
back raw (b"OK" for SET, as Redis sends them).

Only the commands the results path uses; `execute` behaves as redis-py's
`execute(raise_on_error=False)`: a command Redis refused is its ResponseError in the list, in
its place, the others ran. A lost connection is retried as redis-py retries a pipeline, by the
connection's own policy (the result backend's: ~15 s, docs/reliability.md finding 3), the
whole batch of commands again, on a fresh connection; once that gives up, it raises and
nothing is known about what ran.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis


class PackedPipeline:
    """`with PackedPipeline(client) as pipe: pipe.set(...); ...; pipe.execute()`."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._packed: list[bytes] = []

    def __enter__(self) -> PackedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._packed.clear()

    def __len__(self) -> int:
        return len(self._packed)

    def _add(self, *args: Any) -> None:
        self._packed.append(hiredis.pack_command(args))

    def set(self, key: str, value: bytes | str, ex: int | None = None) -> None:
        if ex is None:
            self._add("SET", key, value)
        else:
            self._add("SET", key, value, "EX", int(ex))

    def publish(self, channel: str, message: bytes | str) -> None:
        self._add("PUBLISH", channel, message)

    def zrem(self, key: str, *members: Any) -> None:
        self._add("ZREM", key, *members)

    def hdel(self, key: str, *fields: Any) -> None:
        self._add("HDEL", key, *fields)

    def srem(self, key: str, *members: Any) -> None:
        self._add("SREM", key, *members)

    def rpush(self, key: str, *values: Any) -> None:
        self._add("RPUSH", key, *values)

    def expire(self, key: str, seconds: int) -> None:
        self._add("EXPIRE", key, int(seconds))

    def execute(self) -> list[Any]:
        """Send every command queued, read every reply (a refused command: its error)."""
        if not self._packed:
            return []
        packed, self._packed = self._packed, []
        data, count = b"".join(packed), len(packed)
        conn = self._pool.get_connection()
        try:
            return conn.retry.call_with_retry(lambda: _send(conn, data, count), lambda _error: conn.disconnect())
        except BaseException:
            # mid-reply (or interrupted): the connection is out of step, never reused as it is
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)


def _send(conn: Any, data: bytes, count: int) -> list[Any]:
    conn.send_packed_command([data])
    out: list[Any] = []
    for _ in range(count):
        try:
            out.append(conn.read_response())
        except redis.ResponseError as exc:
            out.append(exc)
    return out


__all__ = ["PackedPipeline"]
