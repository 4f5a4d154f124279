"""Worker and model labels: their syntax, shared by settings, records and heartbeats.

A worker carries labels (`MESH_WORKER_LABELS=env=sklearn-1.5,zone=a`); a model may require some
(`ModelInfo.required_labels`). The syntax is Kubernetes' label syntax, loosely
(https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set).
Which worker may hold which model is decided in mesh/policy/labels.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Kubernetes' label syntax, loosely: a name, then a value (which may be empty); neither may
# hold ',' or '=' (the separators of MESH_WORKER_LABELS) nor spaces.
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?)?$"
MAX_LABELS = 32

_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)


def validate_labels(labels: Mapping[str, str] | None, what: str = "labels") -> dict[str, str]:
    """A checked copy of `labels` (ValueError naming the bad entry)."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"{what} must be a mapping of label name to value")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{what}: at most {MAX_LABELS} labels")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"{what}: invalid label name {key!r} (letters, digits, '_', '-', '.', '/'; "
                             "up to 63, starting and ending with a letter or digit)")  # fmt: skip
        if not isinstance(value, str) or not _VALUE.match(value):
            raise ValueError(f"{what}: invalid value {value!r} for label {key!r} (letters, digits, '_', "
                             "'-', '.'; up to 63, starting and ending with a letter or digit, or empty)")  # fmt: skip
        out[key] = value
    return out


def parse_labels(text: str | None, what: str = "MESH_WORKER_LABELS") -> dict[str, str]:
    """`env=sklearn-1.5,zone=a` -> {"env": "sklearn-1.5", "zone": "a"} (ValueError if malformed)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what}: {item!r} is not name=value")
        key, value = key.strip(), value.strip()
        if key in out:
            raise ValueError(f"{what}: label {key!r} given twice")
        out[key] = value
    return validate_labels(out, what)


def format_labels(labels: Mapping[str, str]) -> str:
    """The inverse of `parse_labels`, sorted: `env=sklearn-1.5,zone=a`."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))



__all__ = ["LABEL_KEY_PATTERN", "LABEL_VALUE_PATTERN", "MAX_LABELS", "format_labels", "parse_labels", "validate_labels"]
