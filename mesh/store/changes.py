"""The registry's change log: which models' records, copies or failures changed, in order.

Every write to a model's record (`<prefix>:models`), its copy records or its failure records
also appends the model's id to one Redis stream (`Keys.changes`), in the same atomic step or
right after the write (never before it: a reader that sees the entry then reads the write).
The scheduler keeps its view of the registry between runs and re-reads only the models named
since its last run (mesh/store/cluster.py), instead of ~4 commands per registered model: at
100,000 models that was seconds per tick (docs/scheduler.md, "Reading the cluster").

A stream, not a counter: its ids are assigned by Redis, so a MULTI/EXEC can append without a
script, and `XINFO STREAM`'s `max-deleted-entry-id` (Redis 7) tells a reader that entries it
had not read yet were trimmed away (then it reads everything again).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class ChangeReader:
    """What changed since a point of the log, for the scheduler's incremental read."""

    BATCH = 10_000

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r = r
        self.key = key

    def head(self) -> str:
        """The log's newest id ("0-0" when empty): where a reader that reads everything now
        resumes from."""
        try:
            info = self.r.xinfo_stream(self.key)
        except redis.ResponseError:  # no such key: nothing was ever logged
            return "0-0"
        last = info.get("last-generated-id") or b"0-0"
        return last.decode() if isinstance(last, bytes) else str(last)

    def since(self, last: str) -> tuple[set[str], str] | None:
        """(ids named after `last`, the newest id read), or None when the log cannot say (it
        was trimmed past `last`, or it is older than `last`: a Redis restarted empty)."""
        try:
            info = self.r.xinfo_stream(self.key)
        except redis.ResponseError:
            return None if last != "0-0" else (set(), last)
        newest = _id(info.get("last-generated-id") or b"0-0")
        deleted = _id(info.get("max-deleted-entry-id") or b"0-0")
        mine = _id(last)
        if newest < mine or deleted > mine:
            return None
        ids: set[str] = set()
        cursor = last
        while True:
            entries = self.r.xrange(self.key, min=f"({cursor}", count=self.BATCH)
            for entry_id, fields in entries:
                value = fields.get(FIELD.encode())
                if value is not None:
                    ids.add(value.decode())
            if entries:
                last_id = entries[-1][0]
                cursor = last_id.decode() if isinstance(last_id, bytes) else last_id
            if len(entries) < self.BATCH:
                break
        # trimmed while we read (a reader far behind, a log under heavy churn): not complete
        after = self.r.xinfo_stream(self.key)
        if _id(after.get("max-deleted-entry-id") or b"0-0") > mine:
            return None
        return ids, cursor


__all__ = ["CHANGE_LOG_MAXLEN", "ChangeReader", "lua_log_change", "log_changes"]
