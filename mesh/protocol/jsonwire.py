"""JSON off the wire, fast, with exactly the values kombu's JSON decoder gives.

Every message a worker takes is JSON decoded twice (the transport's envelope, then Celery's
body), and every mesh result once by its producer; with tensors as JSON lists of numbers the
standard library's decoder (what `kombu.utils.json.loads` calls, with an object hook for every
dict) was a tenth of a worker's CPU on messages of 32 items (docs/benchmarks.md, "JSON off the
wire"). orjson decodes the same text 4-5x faster, but not always to the same values:

- it turns integers beyond 64 bits into floats (the standard decoder keeps them exact);
- kombu's object hook turns `{"__type__": ..., "__value__": ...}` into dates, UUIDs, bytes;
- it refuses what the standard decoder accepts: NaN and Infinity literals, lone surrogates,
  numbers overflowing a float.

So `loads` takes orjson's result only when the text cannot hold any of these (no run of 19 or
more digits, no `__type__`, no `\\u` escape, which could spell either) and orjson accepted it;
anything else goes to kombu's decoder, whose answer (or exception) it returns unchanged.
`dumps` is the other direction, for the producer's message bodies. `encode` writes what
kombu's encoder writes (the same values), faster for the small trees of plain values that task
events are. `install` makes `loads` and `encode` kombu's `json` serializer in this process (the
worker's), which Celery's `Request`, events and control messages use.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from kombu import serialization
from kombu.utils import json as kombu_json

# digits -> "0", anything else -> ".": a long run of digits becomes a substring search
_DIGITS = bytes(48 if 48 <= i <= 57 else 46 for i in range(256))
# 2**63 has 19 digits: shorter integers fit orjson's int64/uint64 exactly; longer digit runs
# (also in a float's mantissa: repr never writes more than 17 significant digits) take the
# exact path
_LONG_NUMBER = b"0" * 19


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """`kombu.utils.json.loads(data)`, faster on the common case."""
    if isinstance(data, str):
        # surrogatepass: a lone surrogate becomes bytes orjson refuses, so the exact path decides
        raw = data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
    if b"__type__" not in raw and b"\\u" not in raw and _LONG_NUMBER not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the exact decoder gives the verdict (and its message)
    return kombu_json.loads(data)


def dumps(obj: Any) -> str:
    """JSON text of `obj` that any JSON decoder reads back as it reads `json.dumps(obj)`
    (not the same characters: compact, non-ASCII unescaped), faster.

    orjson writes NaN and infinities as `null` (they are legal tensor values, which the
    standard library writes as `NaN`, `Infinity`), so its text is taken only when it holds no
    `null` at all; callers encode the parts of a message that hold no None this way. It
    refuses what it cannot write exactly (integers beyond 64 bits, lone surrogates, non-string
    keys, types it does not know): the standard library writes those."""
    try:
        out = orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(obj)
    if b"null" in out:
        return json.dumps(obj)
    return out.decode("utf-8")


# what JSON writes as itself, whoever writes it (exact types: a subclass may have a __json__
# that kombu's encoder would call; a float may be NaN, which orjson writes as null)
_PLAIN = frozenset((str, int, bool, type(None)))


def _plain(obj: Any, depth: int = 0) -> bool:
    """Whether `obj` is a tree of dicts with string keys, lists and tuples, over strings,
    integers, booleans, None and finite floats, at most 32 deep."""
    t = type(obj)
    if t in _PLAIN:
        return True
    if t is float:
        return obj - obj == 0.0  # NaN and infinities give NaN
    if depth >= 32:
        return False
    if t is dict:
        return all(type(k) is str for k in obj) and all(_plain(v, depth + 1) for v in obj.values())
    if t is list or t is tuple:
        return all(_plain(v, depth + 1) for v in obj)
    return False


def encode(obj: Any) -> str:
    """`kombu.utils.json.dumps(obj)`'s values, faster for a tree of plain values (`_plain`):
    orjson's text then (compact, non-ASCII unescaped; integers beyond 64 bits and lone
    surrogates, which orjson refuses, go the standard way). Anything else, kombu's encoder
    (dates, UUIDs and bytes as its tagged objects, `__json__`, NaN). A worker's task events were
    encoded by the standard library's encoder at ~3 us each: 2.5 % of its interpreter time at
    closedloop zipf; 42 events: 123 -> 25 us."""
    if _plain(obj):
        try:
            return orjson.dumps(obj).decode("utf-8")
        except TypeError:  # orjson.JSONEncodeError
            pass
    return kombu_json.dumps(obj)


def install() -> None:
    """kombu's `json` serializer (content type application/json) in this process: decoded
    with `loads`, encoded with `encode`. Idempotent."""
    serialization.register("json", encode, loads, content_type="application/json", content_encoding="utf-8")


__all__ = ["dumps", "encode", "install", "loads"]
