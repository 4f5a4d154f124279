"""The relative-path rule: a repository listing, an S3 key under a prefix and a disk-cache entry
all name files inside a root, and every side must agree which names stay inside it."""

from __future__ import annotations

from mesh.errors import InvalidArgument

MAX_RELPATH = 1024


def safe_relpath(rel: str, what: str = "path") -> str:
    """`rel` if it is a plain relative path that stays inside its root; InvalidArgument otherwise.

    Rejects absolute paths, `.`/`..` segments, empty segments (`a//b`, a trailing `/`),
    backslashes and control characters: a key like `models/../../etc/passwd` or `/etc/passwd`
    names something outside the directory it must stay in.
    """
    if not isinstance(rel, str) or not rel:
        raise InvalidArgument(f"{what} is empty")
    if len(rel) > MAX_RELPATH:
        raise InvalidArgument(f"{what} is longer than {MAX_RELPATH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rel) or "\\" in rel:
        raise InvalidArgument(f"{what} {rel!r} contains control characters or backslashes")
    if rel.startswith("/"):
        raise InvalidArgument(f"{what} {rel!r} is absolute: it escapes its root")
    parts = rel.split("/")
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"{what} {rel!r} has a '.' or '..' segment: it escapes its root")
    if any(p == "" for p in parts):
        raise InvalidArgument(f"{what} {rel!r} has an empty segment")
    return rel
