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
`dumps` is the other direction, for the producer's message bodies. `install` makes `loads`
the decoder of kombu's `json` serializer in this process (the worker's), which Celery's
`Request`, events and control messages use.
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


def install() -> None:
    """Decode kombu's `json` serializer (content type application/json) with `loads` in this
    process; encoding stays kombu's own. Idempotent."""
    serialization.register(
        "json", kombu_json.dumps, loads, content_type="application/json", content_encoding="utf-8"
    )


__all__ = ["dumps", "install", "loads"]
