"""The Redis reads behind the autoscaling signals (mesh/policy/signals.py), bounded in round
trips whatever the number of models: a SCAN of the model queues (only non-empty lists exist),
their lengths and the send time of each one's oldest message in pipelines and a script of
SCAN_CHUNK keys per call, the heartbeats in one MGET per 500 workers, and the records of the
models wanted (pending or loaded: their sizes and the labels they require, i.e. their pool) in
one HMGET per chunk. Registered models that are idle cost nothing but their share of the SCAN."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mesh.models import WorkerState
from mesh.policy.precedence import pick_required_labels
from mesh.protocol.keys import Keys
from mesh.protocol.messages import SENT_AT_HEADER
from mesh.store.state import StateStore

SCAN_CHUNK = 1000  # keys per pipeline or script call
SCAN_COUNT = 10_000  # SCAN's COUNT: keys the server looks at per call

# The send time of the oldest message (the list's tail: kombu pushes on the left and pops on the
# right) of each list in KEYS: the number after the first `"mesh-sent-at":` in it, '' if none.
# Found as text rather than decoded: a message may be megabytes and only its header is wanted.
# The body is a JSON string inside the envelope, where that text would appear escaped (\"), so
# only the header itself matches.
_OLDEST_SENT_LUA = """
local out = {}
for i = 1, #KEYS do
  local raw = redis.call('LINDEX', KEYS[i], -1)
  local t = ''
  if raw then
    local s, e = string.find(raw, ARGV[1], 1, true)
    if s then t = string.match(raw, '^%s*([%d%.eE%+%-]+)', e + 1) or '' end
  end
  out[i] = t
end
return out
"""


@dataclass(frozen=True)
class SignalInputs:
    queued: dict[str, int]  # model id -> requests in its Redis lists (models with some)
    oldest_sent: dict[str, float]  # model id -> epoch seconds its oldest queued request was sent
    workers: list[WorkerState]
    sizes: dict[str, int]  # model id -> bytes, for the models wanted (pending or loaded)
    registered: int
    # model id -> the labels it requires (its pool), for the wanted models that require some
    required: dict[str, dict[str, str]] = field(default_factory=dict)


class SignalReader:
    """Reads one mesh's signal inputs through its state store's client."""

    def __init__(self, store: StateStore, priority_steps: list[int]) -> None:
        self.store, self.r, self.keys = store, store.r, store.keys
        self.priority_steps = priority_steps
        self._oldest = self.r.register_script(_OLDEST_SENT_LUA)

    def read(self) -> SignalInputs:
        queued, oldest = self._queues()
        workers = self.store.live_workers()
        wanted = set(queued) | {m.model_id for w in workers for m in w.models}
        sizes, required = self._records(sorted(wanted))
        return SignalInputs(queued, oldest, workers, sizes, int(self.r.hlen(self.keys.models)), required)

    def _queues(self) -> tuple[dict[str, int], dict[str, float]]:
        keys: Keys = self.keys
        lists: list[tuple[str, str]] = []  # (list key, model id)
        for raw in self.r.scan_iter(match=keys.model_queue_lists_pattern(), count=SCAN_COUNT, _type="list"):
            key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            found = keys.model_of_queue_list(key)
            if found is not None:
                lists.append((key, found[0]))
        queued: dict[str, int] = {}
        oldest: dict[str, float] = {}
        marker = json.dumps(SENT_AT_HEADER) + ":"
        for i in range(0, len(lists), SCAN_CHUNK):
            chunk = lists[i : i + SCAN_CHUNK]
            names = [k for k, _ in chunk]
            with self.r.pipeline(transaction=False) as p:
                for k in names:
                    p.llen(k)
                lengths = p.execute()
            sent = self._oldest(keys=names, args=[marker])
            for (_, model_id), n, t in zip(chunk, lengths, sent):
                if not n:
                    continue
                queued[model_id] = queued.get(model_id, 0) + int(n)
                try:
                    at = float(t)
                except (TypeError, ValueError):
                    continue  # sent without the header (not by a mesh producer): age unknown
                if model_id not in oldest or at < oldest[model_id]:
                    oldest[model_id] = at
        return queued, oldest

    def _records(self, model_ids: list[str]) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
        """Bytes of each model (measured at its last load, else as registered), and the labels
        it requires (`pick_required_labels`: the management API's, else its manifest's)."""
        sizes: dict[str, int] = {}
        required: dict[str, dict[str, str]] = {}
        for i in range(0, len(model_ids), SCAN_CHUNK):
            chunk = model_ids[i : i + SCAN_CHUNK]
            for model_id, raw in zip(chunk, self.r.hmget(self.keys.models, chunk)):
                if raw is None:
                    continue
                try:
                    record = json.loads(raw)
                    info = record.get("info") or {}
                    size = record.get("size_bytes") or info.get("size_bytes")
                    manifest = record.get("manifest")
                    labels = pick_required_labels(
                        info.get("required_labels"),
                        manifest.get("required_labels") if isinstance(manifest, dict) else None,
                    )
                except (ValueError, AttributeError):
                    continue
                if isinstance(size, int) and size > 0:
                    sizes[model_id] = size
                if labels and isinstance(labels, dict):
                    required[model_id] = {str(k): str(v) for k, v in labels.items()}
        return sizes, required


__all__ = ["SignalInputs", "SignalReader"]
