"""Where model files come from: local files, and S3 (MinIO, AWS, ...) through the disk cache.

A model names its files in one of three ways (docs/storage.md):

- `file:///absolute/path` (a file or a directory) on every worker's disk, used in place;
- `s3://bucket/key`: one object, or every object under the prefix `key/`;
- `storage_key` + a relative `path` inside that storage's `bucket` (ModelMesh Serving's
  `storage: {key, path}`).

S3 credentials come from the storage config (`MESH_STORAGE_CONFIG`, ModelMesh Serving's shape:
`{"<key>": {"type": "s3", "access_key_id", "secret_access_key", "endpoint_url", "bucket",
"region", "certificate"}}`). Secrets are `SecretStr`: a repr, a log line or an error message
never shows them. Loading a model file runs its code (joblib), so models come only from
configured storage, and a key or path that escapes its root is rejected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    SecretStr,
    ValidationError,
    field_validator,
)

from mesh.errors import InvalidArgument, MeshError, ModelLoadFailed, PermissionDenied
from mesh.models import ModelInfo
from mesh.protocol.paths import safe_relpath
from mesh.settings import MeshSettings
from mesh.storage.diskcache import CacheLease, DiskCache, Listing, RemoteFile
from mesh.storage.roots import StorageRoots, default_roots, parse_roots

log = logging.getLogger("mesh.storage.sources")

SCHEMES = ("file", "s3")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")  # S3: 3-63 (legacy: 255)
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
MAX_SMALL_OBJECT = 1024 * 1024  # manifests and markers are read whole; refuse anything bigger


# ---------------------------------------------------------------------- storage config
class S3StorageConfig(BaseModel):
    """One entry of the storage config (ModelMesh Serving's s3 type, plus a few options)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["s3"]
    # ModelMesh Serving's own storage-config example (its quickstart's `localMinIO`) spells it
    # `access_key`; both names are accepted (kserve/modelmesh-serving docs/quickstart.md)
    access_key_id: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("access_key_id", "access_key")
    )
    secret_access_key: SecretStr | None = None
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    bucket: str | None = Field(
        default=None, validation_alias=AliasChoices("bucket", "default_bucket")
    )
    region: str | None = None
    certificate: str | None = Field(default=None, description="PEM CA bundle (contents)")
    ca_bundle: str | None = Field(default=None, description="path of a PEM CA bundle")
    verify_ssl: bool = True
    anonymous: bool = False
    addressing_style: Literal["path", "virtual", "auto"] = "path"

    @field_validator("bucket")
    @classmethod
    def _valid_bucket(cls, v: str | None) -> str | None:
        if v is not None and not _BUCKET.match(v):
            raise ValueError("invalid bucket name")
        return v

    def describe(self) -> str:
        return f"endpoint {self.endpoint_url or 'AWS S3'}"


class StorageConfig(RootModel[dict[str, S3StorageConfig]]):
    """`{"<storage key>": S3StorageConfig}`; repr and str show no secret."""

    def names(self) -> list[str]:
        return sorted(self.root)


def load_storage_config(raw: str | SecretStr | None) -> StorageConfig:
    """Parse MESH_STORAGE_CONFIG: inline JSON, the path of a JSON file, or the path of a
    directory holding one file per storage key (a mounted `storage-config` secret).

    Each value may itself be a JSON string (the shape of ModelMesh Serving's `storage-config`
    secret). Errors name the storage key and the field, never a value.
    """
    if isinstance(raw, SecretStr):
        raw = raw.get_secret_value()
    if raw is None or not raw.strip():
        return StorageConfig({})
    text = raw.strip()
    data: Any
    if not text.startswith(("{", "[")) and Path(text).is_dir():
        # ModelMesh Serving's `storage-config` secret mounted as a volume: one file per storage
        # key holding its JSON (Kubernetes' own `..data` links and dotfiles are not keys)
        data = {}
        for entry in sorted(Path(text).iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            try:
                data[entry.name] = entry.read_text()
            except OSError as exc:
                raise InvalidArgument(
                    f"MESH_STORAGE_CONFIG: cannot read {entry.name!r} in the directory it names: {exc.strerror}"
                ) from None
        return _storage_entries(data)
    if not text.startswith(("{", "[")):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise InvalidArgument(
                f"MESH_STORAGE_CONFIG: cannot read the file it names: {exc.strerror}"
            ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(
            f"MESH_STORAGE_CONFIG is not valid JSON (line {getattr(exc, 'lineno', '?')})"
        ) from None
    return _storage_entries(data)


def _storage_entries(data: Any) -> StorageConfig:
    if not isinstance(data, dict):
        raise InvalidArgument("MESH_STORAGE_CONFIG must be a JSON object {storage key: config}")
    entries: dict[str, S3StorageConfig] = {}
    for name, value in data.items():
        if not re.match(r"^[A-Za-z0-9_.-]{1,128}$", str(name)):
            raise InvalidArgument(f"MESH_STORAGE_CONFIG: invalid storage key {name!r}")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidArgument(
                    f"MESH_STORAGE_CONFIG[{name!r}] is a string that is not JSON"
                ) from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"MESH_STORAGE_CONFIG[{name!r}] must be an object")
        kind = value.get("type")
        if kind != "s3":
            raise InvalidArgument(
                f"MESH_STORAGE_CONFIG[{name!r}]: storage type {kind!r} is not supported "
                "(supported: 's3', which covers MinIO and other S3-compatible stores)"
            )
        try:
            entries[name] = S3StorageConfig.model_validate(value)
        except ValidationError as exc:
            # pydantic's message would quote the input (a secret, maybe): name fields only
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidArgument(f"MESH_STORAGE_CONFIG[{name!r}]: {problems}") from None
    return StorageConfig(entries)


# ---------------------------------------------------------------------- locations
@dataclass(frozen=True)
class Location:
    """A parsed model location. For s3, `bucket` is None when it comes from the storage key."""

    scheme: Literal["file", "s3"]
    path: str = ""  # file: the absolute local path
    bucket: str | None = None
    key: str = ""  # s3: the object key or prefix (a trailing '/' means a prefix)
    storage_key: str | None = None

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        where = f"s3://{self.bucket}/{self.key}" if self.bucket else f"{self.key} in storage {self.storage_key!r}"
        return where


def check_key(key: str, what: str = "s3 key") -> str:
    """An S3 key or prefix that stays inside its bucket/root (a trailing '/' marks a prefix)."""
    body = key[:-1] if key.endswith("/") else key
    safe_relpath(body, f"{what} {key!r}")
    return key


def parse_location(uri: str, storage_key: str | None = None) -> Location:
    """Parse and validate a model location; InvalidArgument with the reason if it is unusable."""
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument("model uri is empty")
    parsed = urlparse(uri)
    if parsed.scheme == "":
        if storage_key is None:
            raise InvalidArgument(
                f"model uri {uri!r} has no scheme: use file:///abs/path, s3://bucket/key, or "
                "set storage_key to name a path inside that storage's bucket"
            )
        return Location("s3", key=check_key(uri, "path"), storage_key=storage_key)
    if parsed.scheme not in SCHEMES:
        raise InvalidArgument(
            f"unsupported model uri {uri!r}: use one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parsed.params or parsed.query or parsed.fragment:
        raise InvalidArgument(f"model uri {uri!r} must not have parameters, a query or a fragment")
    if parsed.scheme == "file":
        if storage_key is not None:
            raise InvalidArgument(f"file uri {uri!r} takes no storage_key")
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"file uri {uri!r} names a host; use file:///absolute/path")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise InvalidArgument(f"file uri {uri!r} must hold an absolute path")
        if ".." in Path(path).parts:
            raise InvalidArgument(f"model uri {uri!r} must not contain '..'")
        return Location("file", path=path)
    bucket = parsed.netloc
    if not _BUCKET.match(bucket):
        raise InvalidArgument(f"s3 uri {uri!r}: invalid bucket name {bucket!r}")
    key = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
    if not key:
        raise InvalidArgument(f"s3 uri {uri!r} names no object or prefix")
    return Location("s3", bucket=bucket, key=check_key(key), storage_key=storage_key)


def validate_uri(uri: str, storage_key: str | None = None) -> str:
    """Reject model locations Mesh cannot load before they are registered (INVALID_ARGUMENT)."""
    parse_location(uri, storage_key)
    return uri


def local_path(uri: str) -> Path:
    """The local file or directory of a `file://` model URI."""
    loc = parse_location(uri)
    if loc.scheme != "file":
        raise InvalidArgument(f"{uri!r} is not a local file uri")
    path = Path(loc.path)
    if not path.exists():
        raise ModelLoadFailed(f"model file not found: {path}")
    return path


# ---------------------------------------------------------------------- S3 access
@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None


class S3Store:
    """One storage-config entry: a boto3 client with bounded timeouts and retries.

    Every failure is a ModelLoadFailed saying what was attempted, where, and what to check.
    """

    def __init__(self, name: str, cfg: S3StorageConfig, settings: MeshSettings, ca_dir: Path) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.name = name
        self.cfg = cfg
        verify: bool | str = cfg.verify_ssl
        if cfg.ca_bundle:
            verify = cfg.ca_bundle
        elif cfg.certificate:
            verify = str(_write_ca(cfg.certificate, ca_dir))
        kwargs: dict[str, Any] = {}
        if not cfg.anonymous and cfg.access_key_id is not None:
            kwargs["aws_access_key_id"] = cfg.access_key_id.get_secret_value()
        if not cfg.anonymous and cfg.secret_access_key is not None:
            kwargs["aws_secret_access_key"] = cfg.secret_access_key.get_secret_value()
        config = Config(
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
            s3={"addressing_style": cfg.addressing_style},
            signature_version=UNSIGNED if cfg.anonymous else "s3v4",
            user_agent_extra="mesh",
        )
        # A session per store: boto3's default session is not thread-safe to create clients in.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region or "us-east-1",
            verify=verify,
            config=config,
            **kwargs,
        )

    def where(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key} (storage key {self.name!r}, {self.cfg.describe()})"

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404 and _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            if _status(exc) == 403:
                exc = self._explain_403(bucket, key, exc)
            raise self._error("cannot read", bucket, key, exc) from None
        return ObjectInfo(key, int(r["ContentLength"]), _etag(r.get("ETag")))

    def _explain_403(self, bucket: str, key: str, exc: Exception) -> Exception:
        """A HEAD answer has no body, so a 403 does not say why: ask with a call that does."""
        try:
            self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except Exception as detailed:
            if _code(detailed) not in ("", "403"):
                return detailed
        return exc

    def list(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` (paginated), without directory-marker objects."""
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                r = self.client.list_objects_v2(**kwargs)
            except Exception as exc:
                raise self._error("cannot list", bucket, prefix, exc) from None
            for o in r.get("Contents", []):
                if not o["Key"].endswith("/"):
                    out.append(ObjectInfo(o["Key"], int(o["Size"]), _etag(o.get("ETag"))))
            if not r.get("IsTruncated"):
                return out
            token = r.get("NextContinuationToken")

    def read_bytes(self, bucket: str, key: str, max_bytes: int = MAX_SMALL_OBJECT) -> bytes:
        try:
            r = self.client.get_object(Bucket=bucket, Key=key)
            if int(r.get("ContentLength", 0)) > max_bytes:
                r["Body"].close()
                raise ModelLoadFailed(f"{self.where(bucket, key)} is larger than {max_bytes} bytes")
            return r["Body"].read()
        except MeshError:
            raise
        except Exception as exc:
            raise self._error("cannot read", bucket, key, exc) from None

    def stream(
        self, bucket: str, key: str, etag: str | None, sink: Callable[[bytes], None]
    ) -> str | None:
        """Stream an object into `sink`; returns its MD5 when the ETag is one (see `_md5_of`)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'  # the object we listed, not one replaced since
        try:
            r = self.client.get_object(**kwargs)
            body = r["Body"]
            try:
                for chunk in body.iter_chunks(1024 * 1024):
                    sink(chunk)
            finally:
                body.close()
        except MeshError:
            raise
        except Exception as exc:
            raise self._error("cannot download", bucket, key, exc) from None
        return _md5_of(_etag(r.get("ETag")), r.get("ServerSideEncryption"), r.get("SSECustomerAlgorithm"))

    def _error(self, action: str, bucket: str, key: str, exc: Exception) -> ModelLoadFailed:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
            SSLError,
        )

        where = self.where(bucket, key)
        code, status = _code(exc), _status(exc)
        if isinstance(exc, NoCredentialsError):
            hint = "no credentials: set access_key_id and secret_access_key in MESH_STORAGE_CONFIG"
        elif isinstance(exc, SSLError):
            hint = f"TLS error ({type(exc).__name__}): check 'certificate' / 'ca_bundle'"
        elif isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
            hint = f"endpoint unreachable ({type(exc).__name__}): check endpoint_url and the network"
        elif isinstance(exc, ReadTimeoutError):
            hint = "the endpoint stopped answering (read timeout, MESH_S3_READ_TIMEOUT_S)"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "InvalidToken", "ExpiredToken"):
            hint = f"access denied ({code}): check access_key_id and secret_access_key"
        elif code == "AccessDenied":
            hint = f"access denied ({code}): the credentials may not read this bucket or key"
        elif status == 403:
            hint = (
                "access denied (HTTP 403): check access_key_id and secret_access_key, and that "
                "they may read this bucket"
            )
        elif code == "NoSuchBucket":
            hint = f"bucket {bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            hint = "no such object"
        elif code in ("PreconditionFailed", "412"):
            hint = "the object changed while it was being downloaded; retry"
        elif code:
            hint = f"{code} (HTTP {status})"
        else:
            hint = f"{type(exc).__name__}: {str(exc)[:300]}"
        return ModelLoadFailed(f"{action} {where}: {hint}")


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


def _etag(raw: str | None) -> str | None:
    return raw.strip('"') if raw else None


def _md5_of(etag: str | None, sse: str | None, ssec: str | None) -> str | None:
    """The object's MD5 if its ETag is one: single-part uploads without KMS or SSE-C encryption
    (multipart ETags end in '-<parts>'; encrypted objects' ETags are not their MD5)."""
    if etag and _PLAIN_MD5.match(etag) and sse in (None, "AES256") and not ssec:
        return etag
    return None


def _write_ca(pem: str, ca_dir: Path) -> Path:
    ca_dir.mkdir(parents=True, exist_ok=True)
    path = ca_dir / f"{hashlib.sha256(pem.encode()).hexdigest()[:32]}.pem"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(pem)
        os.replace(tmp, path)
    return path


class S3Source:
    """A model on S3 as the disk cache sees it: one object, or the objects under a prefix."""

    def __init__(self, store: S3Store, bucket: str, key: str) -> None:
        self.store, self.bucket, self.key = store, bucket, key
        self.description = f"s3://{bucket}/{key}"

    def listing(self) -> Listing:
        prefix = self.key
        if not self.key.endswith("/"):
            head = self.store.head(self.bucket, self.key)
            if head is not None:
                name = self.key.rsplit("/", 1)[-1]
                return Listing((RemoteFile(name, head.size, head.key, head.etag),), single=True)
            prefix = self.key + "/"
        objects = self.store.list(self.bucket, prefix)
        if not objects:
            raise ModelLoadFailed(
                f"no object or prefix at {self.store.where(self.bucket, self.key)}"
            )
        files = []
        for o in objects:
            rel = o.key[len(prefix) :]
            try:
                safe_relpath(rel)
            except InvalidArgument as exc:
                raise ModelLoadFailed(
                    f"{self.description}: object {o.key!r} escapes the model's prefix ({exc})"
                ) from None
            files.append(RemoteFile(rel, o.size, o.key, o.etag))
        return Listing(tuple(sorted(files, key=lambda f: f.relpath)), single=False)

    def download(self, file: RemoteFile, sink: Callable[[bytes], None]) -> str | None:
        return self.store.stream(self.bucket, file.ref, file.etag, sink)


# ---------------------------------------------------------------------- storage
class LocalLease:
    """A `file://` model is used in place: nothing to pin."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def release(self) -> None:
        return None


class Storage:
    """Resolves model locations for one set of settings: S3 stores, the disk cache."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._config: StorageConfig | None = None
        self._stores: dict[str, S3Store] = {}
        self._cache: DiskCache | None = None
        self._roots: StorageRoots | None = None

    @property
    def roots(self) -> StorageRoots:
        """Where this worker may load models from (mesh/storage/roots.py)."""
        if self._roots is None:
            raw = self.settings.storage_roots
            if raw is not None and raw.strip():
                self._roots = parse_roots(raw)
            else:
                buckets = sorted({c.bucket for c in self.config.root.values() if c.bucket})
                self._roots = default_roots(self.settings.model_dir, buckets, bool(self.config.root))
        return self._roots

    def _denied(self, what: str) -> PermissionDenied:
        roots = self.roots
        return PermissionDenied(
            f"PERMISSION_DENIED: {what} is outside this worker's storage roots "
            f"({roots.describe()}, from {roots.source}); nothing was read. An operator allows "
            "more locations with MESH_STORAGE_ROOTS (docs/security.md)."
        )

    @property
    def config(self) -> StorageConfig:
        if self._config is None:
            self._config = load_storage_config(self.settings.storage_config)
        return self._config

    @property
    def cache_dir(self) -> Path:
        if self.settings.disk_cache_dir:
            return Path(self.settings.disk_cache_dir)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "mesh" / "models"

    @property
    def cache(self) -> DiskCache:
        with self._lock:
            if self._cache is None:
                self._cache = DiskCache(self.cache_dir, self.settings.disk_cache_bytes)
            return self._cache

    def resolve_s3(self, loc: Location) -> tuple[S3Store, str, str]:
        """(store, bucket, key) for an s3 location, choosing the storage-config entry.

        With `storage_key`, that entry. Otherwise the one entry whose bucket is exactly the
        uri's: an entry's credentials never serve a bucket it does not name (before, an unknown
        bucket fell back to the "default" or only entry, so a registration could make workers
        read any bucket those credentials reach). An entry without a bucket serves only models
        that name it by storage_key, in buckets MESH_STORAGE_ROOTS allows.
        """
        cfg = self.config
        name = loc.storage_key
        if name is None:
            matching = [n for n, c in cfg.root.items() if c.bucket == loc.bucket]
            if len(matching) == 1:
                name = matching[0]
            elif not cfg.root:
                raise ModelLoadFailed(
                    f"{loc} needs S3 credentials: set MESH_STORAGE_CONFIG (docs/storage.md)"
                )
            elif not matching:
                raise ModelLoadFailed(
                    f"{loc}: no MESH_STORAGE_CONFIG entry has bucket {loc.bucket!r} "
                    f"(entries: {', '.join(cfg.names())}); name one with the model's storage_key"
                )
            else:
                raise ModelLoadFailed(
                    f"{loc}: several storage config entries could serve it "
                    f"({', '.join(matching)}); set the model's storage_key"
                )
        entry = cfg.root.get(name)
        if entry is None:
            raise ModelLoadFailed(
                f"storage key {name!r} is not in MESH_STORAGE_CONFIG "
                f"(known: {', '.join(cfg.names()) or 'none'})"
            )
        bucket = loc.bucket or entry.bucket
        if not bucket:
            raise ModelLoadFailed(
                f"{loc}: storage key {name!r} has no bucket; give one in the config or use s3://bucket/key"
            )
        if entry.bucket is not None and bucket != entry.bucket:
            raise ModelLoadFailed(
                f"{loc}: storage key {name!r} serves bucket {entry.bucket!r}, not {bucket!r}"
            )
        if not self.roots.allows_s3(bucket, loc.key):
            raise self._denied(f"s3://{bucket}/{loc.key}")
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = S3Store(name, entry, self.settings, self.cache_dir / "ca")
        return store, bucket, loc.key

    def local_file(self, uri: str) -> Path:
        """A `file://` model's path, resolved (symlinks, '..') and checked against the roots
        before anything reads it; the resolved path is what gets loaded, so a link changed
        after the check cannot redirect the load."""
        path = local_path(uri)
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise ModelLoadFailed(f"model file {path} cannot be resolved: {exc}") from None
        if not self.roots.allows_file(resolved):
            shown = str(path) if resolved == path else f"{path} (resolved: {resolved})"
            raise self._denied(shown)
        return resolved

    def acquire(self, uri: str, storage_key: str | None = None) -> CacheLease | LocalLease:
        """The model's files on local disk, pinned in the disk cache until `release()`."""
        loc = parse_location(uri, storage_key)
        if loc.scheme == "file":
            return LocalLease(self.local_file(uri))
        store, bucket, key = self.resolve_s3(loc)
        cache_key = "\n".join(("s3", store.name, store.cfg.endpoint_url or "aws", bucket, key))
        return self.cache.acquire(cache_key, S3Source(store, bucket, key))


_storages: dict[tuple, Storage] = {}
_storages_lock = threading.Lock()


def get_storage(settings: MeshSettings) -> Storage:
    """One Storage per distinct storage-related settings in this process (clients are reused)."""
    fields = (
        "storage_config", "disk_cache_dir", "disk_cache_bytes", "s3_connect_timeout_s",
        "s3_read_timeout_s", "s3_max_attempts", "storage_roots", "model_dir",
    )  # fmt: skip
    items = []
    for f in fields:
        v = getattr(settings, f)
        items.append(v.get_secret_value() if isinstance(v, SecretStr) else v)
    key = tuple(items)
    with _storages_lock:
        storage = _storages.get(key)
        if storage is None:
            storage = _storages[key] = Storage(settings)
        return storage


# ---------------------------------------------------------------------- worker pins
# A worker pins the files of each model it has loaded (or is loading) so that the disk cache
# never evicts them: `acquire_model` at load, `release_model` at unload. One pin per model id
# and process (the model manager loads a model at most once at a time); release is idempotent.
_pins: dict[str, CacheLease | LocalLease] = {}
_pins_lock = threading.Lock()


def acquire_model(model_id: str, info: ModelInfo, settings: MeshSettings) -> Path:
    lease = get_storage(settings).acquire(info.uri, info.storage_key)
    with _pins_lock:
        previous = _pins.pop(model_id, None)
        _pins[model_id] = lease
    if previous is not None:
        previous.release()
    return lease.path


def release_model(model_id: str) -> None:
    with _pins_lock:
        lease = _pins.pop(model_id, None)
    if lease is not None:
        lease.release()
