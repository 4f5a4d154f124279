"""The registry's change log: which models' records, copies or failures changed, in order.

Every write to a model's record (`<prefix>:models`), its copy records or its failure records
also appends the model's id to one Redis stream (`Keys.changes`), in the same atomic step or
right after the write (never before it: a reader that sees the entry then reads the write).
The scheduler keeps its view of the registry between runs and re-reads only the models named
since its last run (mesh/store/cluster.py), instead of ~4 commands per registered model: at
100,000 models that was seconds per tick (docs/scheduler.md, "Reading the cluster").

A stream, not a counter: its ids are assigned by Redis, so a MULTI/EXEC can append without a
script, and `XINFO STREAM`'s `entries-added` (Redis 7) tells a reader that entries it had not
read yet were trimmed away: fewer entries after its point than were added since (then it
reads everything again).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import redis

# Entries kept (approximately: `MAXLEN ~` trims whole nodes, cheaply). A scheduler that falls
# further behind than this reads the whole registry once; at a thousand changes a second this
# is over a minute and a half of runs.
CHANGE_LOG_MAXLEN = 100_000
FIELD = "m"


def log_changes(pipe: redis.client.Pipeline, key: str, model_ids: Iterable[str]) -> None:
    """Append `model_ids` to the change log in the caller's pipeline (after its writes)."""
    for model_id in model_ids:
        pipe.xadd(key, {FIELD: model_id}, maxlen=CHANGE_LOG_MAXLEN, approximate=True)


def lua_log_change(key: str, model_id: str) -> str:
    """The Lua statement that appends to the change log: `key` and `model_id` are Lua
    expressions (e.g. "KEYS[6]", "ARGV[1]")."""
    return f"redis.call('XADD', {key}, 'MAXLEN', '~', {CHANGE_LOG_MAXLEN}, '*', '{FIELD}', {model_id})\n"


def _id(raw: bytes | str | None) -> tuple[int, int]:
    text = (raw.decode() if isinstance(raw, bytes) else raw) or "0-0"
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(raw: bytes | str | None) -> str:
    return (raw.decode() if isinstance(raw, bytes) else raw) or "0-0"


class Mark(NamedTuple):
    """A point of the log: the newest id read, and how many entries the log had been given
    then (`entries-added`: entries trimmed since are missing from what a reader reads after)."""

    id: str = "0-0"
    added: int = 0


class ChangeReader:
    """What changed since a point of the log, for the scheduler's incremental read."""

    BATCH = 10_000

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r = r
        self.key = key

    def _info(self) -> Mark:
        try:
            info = self.r.xinfo_stream(self.key)
        except redis.ResponseError:  # no such key: nothing was ever logged
            return Mark()
        return Mark(_text(info.get("last-generated-id")), int(info.get("entries-added") or 0))

    def head(self) -> Mark:
        """The log's newest point: where a reader that reads everything now resumes from."""
        return self._info()

    def since(self, mark: Mark) -> tuple[set[str], Mark] | None:
        """(ids named after `mark`, the point read up to), or None when the log cannot say:
        entries after `mark` were trimmed away (a reader far behind), or the log is older than
        `mark` (a Redis that restarted empty)."""
        now = self._info()
        if _id(now.id) < _id(mark.id) or now.added < mark.added or (now.added == mark.added and now.id != mark.id):
            return None
        ids: set[str] = set()
        cursor, n = mark.id, 0
        while now.added > mark.added + n:
            entries = self.r.xrange(self.key, min=f"({cursor}", max=now.id, count=self.BATCH)
            for _entry_id, fields in entries:
                value = fields.get(FIELD.encode())
                if value is not None:
                    ids.add(value.decode())
            n += len(entries)
            if len(entries) < self.BATCH:
                break
            cursor = _text(entries[-1][0])
        if mark.added + n != now.added:
            return None  # some of them are gone: trimmed before we read them
        return ids, now


__all__ = ["CHANGE_LOG_MAXLEN", "ChangeReader", "Mark", "lua_log_change", "log_changes"]
