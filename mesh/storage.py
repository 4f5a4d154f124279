"""Where model files come from. `file://` here; S3 and the disk cache join in their own issue.

Loading a model file runs its code (joblib), so models come only from configured storage and
a URI is resolved strictly: absolute paths only, no `..` segments.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import InvalidArgument, ModelLoadFailed

SCHEMES = ("file",)


def validate_uri(uri: str) -> str:
    """Reject URIs Mesh cannot load before they are registered (clear INVALID_ARGUMENT)."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise InvalidArgument(f"unsupported model uri {uri!r}: use one of {', '.join(s + '://' for s in SCHEMES)}")
    if parsed.netloc not in ("", "localhost"):
        raise InvalidArgument(f"file uri {uri!r} names a host; use file:///absolute/path")
    path = unquote(parsed.path)
    if not path.startswith("/"):
        raise InvalidArgument(f"file uri {uri!r} must hold an absolute path")
    if ".." in Path(path).parts:
        raise InvalidArgument(f"model uri {uri!r} must not contain '..'")
    return uri


def local_path(uri: str) -> Path:
    """The local file or directory for a model URI (downloading it first, for remote storage)."""
    validate_uri(uri)
    path = Path(unquote(urlparse(uri).path))
    if not path.exists():
        raise ModelLoadFailed(f"model file not found: {path}")
    return path
