"""Where a worker may load models from (`MESH_STORAGE_ROOTS`): the trust boundary between
whoever can write a model record (anyone with write access to the registry in Redis) and the
code a model file runs when it is loaded (a joblib file is a pickle).

A root is a local directory (`file:///abs/dir`), a bucket (`s3://bucket`) or a prefix inside
one (`s3://bucket/prefix`). A local model is checked after its path is resolved (symlinks,
`..`), before anything is read; an S3 model by its bucket and key, before any request to the
store. Pure: the worker's storage (mesh/storage/sources.py) does the I/O and calls `allows_*`.

Without the setting, the roots are the operator's own configuration: `MESH_MODEL_DIR` and the
bucket of every `MESH_STORAGE_CONFIG` entry. With neither set, nothing restricts loads (one-command
local development); the worker says so loudly at start (docs/security.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mesh.errors import InvalidArgument
from mesh.protocol.paths import safe_relpath

ANYWHERE = "*"  # MESH_STORAGE_ROOTS=* : no restriction, chosen on purpose
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")


@dataclass(frozen=True)
class S3Root:
    bucket: str
    prefix: str = ""  # "" is the whole bucket; otherwise a key prefix without a trailing '/'

    def allows(self, bucket: str, key: str) -> bool:
        if bucket != self.bucket:
            return False
        if not self.prefix:
            return True
        key = key.rstrip("/")
        return key == self.prefix or key.startswith(self.prefix + "/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class StorageRoots:
    files: tuple[Path, ...] = ()  # resolved directories (or files)
    s3: tuple[S3Root, ...] = ()
    unrestricted: bool = False
    source: str = "MESH_STORAGE_ROOTS"  # where the roots came from, for messages

    def allows_file(self, resolved: Path) -> bool:
        """`resolved` must already be resolved (Path.resolve): symlinks and '..' followed."""
        return self.unrestricted or any(resolved == r or r in resolved.parents for r in self.files)

    def allows_s3(self, bucket: str, key: str) -> bool:
        return self.unrestricted or any(r.allows(bucket, key) for r in self.s3)

    def describe(self) -> str:
        if self.unrestricted:
            return "anywhere"
        shown = [f"file://{p}" for p in self.files] + [str(r) for r in self.s3]
        return ", ".join(shown) if shown else "nowhere"


def parse_root(text: str) -> Path | S3Root:
    """One root: `file:///abs/dir`, a bare absolute path, `s3://bucket` or `s3://bucket/prefix`."""
    raw = text.strip()
    if raw.startswith("/"):
        raw = "file://" + raw
    parsed = urlparse(raw)
    if parsed.query or parsed.fragment or parsed.params:
        raise InvalidArgument(f"storage root {text!r} must not have parameters, a query or a fragment")
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise InvalidArgument(f"storage root {text!r}: use file:///absolute/dir")
        # resolved now, so that a model's resolved path compares with what the link points to
        return Path(path).resolve()
    if parsed.scheme == "s3":
        if not _BUCKET.match(parsed.netloc):
            raise InvalidArgument(f"storage root {text!r}: invalid bucket name {parsed.netloc!r}")
        prefix = parsed.path.strip("/")
        if prefix:
            safe_relpath(prefix, f"storage root {text!r}")
        return S3Root(parsed.netloc, prefix)
    raise InvalidArgument(f"storage root {text!r}: use file:///abs/dir, s3://bucket or s3://bucket/prefix")


def parse_roots(raw: str, source: str = "MESH_STORAGE_ROOTS") -> StorageRoots:
    """A comma-separated list of roots, or `*` for no restriction."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if parts == [ANYWHERE]:
        return StorageRoots(unrestricted=True, source=source)
    if ANYWHERE in parts:
        raise InvalidArgument(f"{source}: '*' (anywhere) cannot be combined with other roots")
    roots = [parse_root(p) for p in parts]
    return StorageRoots(
        files=tuple(r for r in roots if isinstance(r, Path)),
        s3=tuple(r for r in roots if isinstance(r, S3Root)),
        source=source,
    )


def default_roots(model_dir: str | None, buckets: list[str], storage_configured: bool = False) -> StorageRoots:
    """The roots when MESH_STORAGE_ROOTS is unset: the model repository and the configured
    buckets; no restriction only when neither a repository nor a storage config is set (a
    storage config whose entries name no bucket allows no bucket by default)."""
    if model_dir and "://" not in model_dir:
        model_dir = str(Path(model_dir).resolve())  # a relative MESH_MODEL_DIR is the cwd's
    parts = ([model_dir] if model_dir else []) + [f"s3://{b}" for b in buckets]
    if not parts and not storage_configured:
        return StorageRoots(unrestricted=True, source="the default (nothing configured)")
    return parse_roots(",".join(parts), source="the default (MESH_MODEL_DIR and MESH_STORAGE_CONFIG's buckets)")


__all__ = ["ANYWHERE", "S3Root", "StorageRoots", "default_roots", "parse_root", "parse_roots"]
