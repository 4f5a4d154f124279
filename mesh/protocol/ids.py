"""Ids: what a model or vmodel id may be, and its one encoding into Redis keys and queue names.

A model or vmodel id is any non-empty UTF-8 string of at most `MAX_ID_BYTES` bytes without NUL,
as in ModelMesh, whose ids are opaque strings carried in `mm-model-id` (ASCII) or
`mm-model-id-bin` (UTF-8) gRPC metadata (https://github.com/kserve/modelmesh, docs/README.md
and src/main/java/com/ibm/watson/modelmesh/GrpcSupport.java). People always see that string;
Redis only ever sees `encode_id`'s form of it.

Worker ids (Celery node names) and mesh prefixes keep their own narrower rules: Mesh makes
them itself, and they must stay plain in `ps`, Flower and ACL patterns.
"""

from __future__ import annotations

import functools
import re

from mesh.errors import InvalidId

# ModelMesh sets no length of its own (its bound is gRPC's metadata size, 8 KiB by default for
# all headers together). ModelMesh Serving's generated ids, `<isvc name>__isvc-<10 hex>` with a
# Kubernetes name of up to 253 characters, reach 270 bytes; 512 leaves room and keeps every
# encoded key under 1.6 KB (at worst 3 bytes of key per byte of id).
MAX_ID_BYTES = 512

# Characters that stand for themselves in a key or queue name: exactly the ids valid before
# UTF-8 ids, so an existing deployment's keys and queues keep their names. Everything else
# (`%` itself, glob characters `*?[]`, `\`, whitespace, `/`, control characters, non-ASCII) is
# percent-encoded, byte by byte of its UTF-8 form, in upper-case hex (RFC 3986 §2.1). No key
# or queue then holds a glob character (ACL patterns and SCAN stay exact), kombu's priority
# separator `\x06\x16`, or anything a terminal or a log would render as something else.
SAFE_CHARS = "A-Za-z0-9_.:@-"
_SAFE = re.compile(f"[{SAFE_CHARS}]+")
_ENCODED = re.compile(f"(?:[{SAFE_CHARS}]|%[0-9A-F]{{2}})+")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")
_HEX = "0123456789ABCDEF"


def _problem(value: object) -> str | None:
    """Why `value` is not an id, or None if it is one."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) <= MAX_ID_BYTES and _SAFE.fullmatch(value):
        return None  # the common case, checked without encoding
    if "\x00" in value:
        return "contains NUL"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_ID_BYTES:
        return f"is {size} bytes of UTF-8, more than {MAX_ID_BYTES}"
    return None


def _shown(value: object) -> str:
    if not isinstance(value, str):
        return ""
    text = repr(value if len(value) <= 60 else value[:57] + "...")
    return f" {text}"


def validate_id(value: object, kind: str = "model") -> str:
    """Return `value` if it is a valid id, else raise `InvalidId` naming the kind and the rule."""
    problem = _problem(value)
    if problem is not None:
        raise InvalidId(
            f"invalid {kind} id{_shown(value)}: it {problem}; an id is 1-{MAX_ID_BYTES} bytes of UTF-8 without NUL"
        )
    return value  # type: ignore[return-value]


def is_valid_id(value: object) -> bool:
    return _problem(value) is None


def encode_id(value: str, kind: str = "model") -> str:
    """The form of a valid id inside Redis keys and queue names (`decode_id`'s inverse): the
    id itself when it holds only `SAFE_CHARS`, else its UTF-8 bytes percent-encoded outside
    them. Raises `InvalidId` for an invalid id, so no invalid id ever names a key."""
    validate_id(value, kind)
    if _SAFE.fullmatch(value):
        return value
    return _encoded(value)


# Every request names its queue (and a worker reads it back) by the id: the few ids of a pool
# are encoded and decoded once, not per message.
@functools.lru_cache(maxsize=4096)
def _encoded(value: str) -> str:
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{_HEX[b >> 4]}{_HEX[b & 15]}" for b in value.encode("utf-8"))


def decode_id(text: object) -> str | None:
    """The id whose `encode_id` is `text`, or None when `text` is no encoding of a valid id
    (a name a producer made up: bad escapes, lower-case hex, an escaped safe character, bytes
    that are not UTF-8, NUL, too long). Exactly one text decodes to each id, so two names never
    stand for one model."""
    if not isinstance(text, str) or not text or len(text) > 3 * MAX_ID_BYTES:
        return None  # (the longest encoding is 3 characters a byte: nothing longer is read)
    if _SAFE.fullmatch(text):
        return text if len(text) <= MAX_ID_BYTES else None
    if not _ENCODED.fullmatch(text):
        return None
    return _decoded(text)


@functools.lru_cache(maxsize=4096)
def _decoded(text: str) -> str | None:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(text[i]))
            i += 1
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not is_valid_id(value) or encode_id(value) != text:
        return None
    return value


# A prefix starts every key (`<prefix>:...`) and queue (`<prefix>.model....`) of a mesh. With
# ':' or '.' allowed, one mesh's prefix could be the start of another's keys ('a' and
# 'a:copies' both own 'a:copies:<model>'); without them, the text before the first ':' or '.'
# of any key names its mesh alone.
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_prefix(value: object) -> str:
    """Return `value` if it is a valid mesh prefix, else raise `InvalidId` with the rule."""
    if not isinstance(value, str) or not PREFIX_PATTERN.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
        raise InvalidId(
            f"invalid prefix {shown!r}: use 1-64 characters from [A-Za-z0-9_-] "
            "(no ':' or '.', which would let one mesh's keys fall under another's prefix)"
        )
    return value
