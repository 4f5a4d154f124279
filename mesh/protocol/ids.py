"""Id validation: model, vmodel and worker ids become Redis keys and queue names."""

from __future__ import annotations

import re

from mesh.errors import InvalidId

# ModelMesh Serving's generated ids look like `name__isvc-<hash>`; repository versions like
# `name@3`; Celery worker names like `w1@host`. Nothing that could split a key or a queue name
# (whitespace, `*`, `?`, `[`, `/`, control characters) is allowed.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")


def validate_id(value: object, kind: str = "model") -> str:
    """Return `value` if it is a valid id, else raise `InvalidId` naming the kind and the rule."""
    if not isinstance(value, str):
        raise InvalidId(f"{kind} id must be a string, got {type(value).__name__}")
    if not ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise InvalidId(
            f"invalid {kind} id {shown!r}: use 1-200 characters from [A-Za-z0-9_.:@-]"
        )
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


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None
