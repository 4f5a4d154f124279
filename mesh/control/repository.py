"""The model repository: a directory tree (local or S3) that the mesh serves with no API call.

Layout under MESH_MODEL_DIR (docs/storage.md has the full rules):

    <name>/mesh.json              optional manifest for every version of <name>
    <name>/<version>/...          the model's files; <version> is an integer (1, 2, 20260101)
    <name>/<version>/mesh.json    optional manifest for this version (overrides the one above)
    <name>/<version>/_READY       the publish marker, written LAST: without it the version
                                  does not exist for the mesh (a half-uploaded version is
                                  never registered, so never loaded)

Each published version is the concrete model `<name>@<version>`; the vmodel `<name>` (owner
`mesh-repository`) follows the highest published version through a normal vmodel cutover.
Versions that disappear (or lose their marker) are unregistered once no vmodel references them.

This module does the sync's I/O: list the repository, read the manifests, ask
mesh/policy/repository.py's pure `plan_sync` what to change, and apply that to a `ModelRegistry`.
The beat scheduler runs it every MESH_REPOSITORY_SYNC_INTERVAL_S (task `mesh.sync_repository`).

Safety rule: a problem never removes anything. If the listing fails the sync changes nothing;
a problem under a name (an invalid manifest, no runtime, a conflicting registration, a vmodel
owned by someone else) freezes that name until it is fixed, and is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import redis
from celery import Celery
from pydantic import BaseModel

from mesh.control.registry import MeshRegistry
from mesh.errors import FailedPrecondition, InvalidArgument, MeshError
from mesh.models import ModelInfo, ModelManifest, ModelRecord, VModelRecord
from mesh.policy.repository import (
    REPO_OWNER,
    RepoFile,
    SyncPlan,
    desired_versions,
    parse_manifest,
    plan_sync,
    scan,
)
from mesh.protocol.paths import safe_relpath
from mesh.settings import MeshSettings
from mesh.storage.sources import S3Store, Storage, check_key, get_storage, parse_location

log = logging.getLogger("mesh.control.repository")

MAX_MANIFEST_BYTES = 64 * 1024
LOCK_TTL_MIN_S = 120.0  # the sync lock's lease (longer than the slowest sync)


class SyncReport(BaseModel):
    """What one sync saw and did (returned by `sync_repository`, the task's result)."""

    model_dir: str
    ok: bool = True
    skipped: bool = False  # another sync held the lock
    error: str | None = None  # the sync did nothing (e.g. the listing failed)
    versions: dict[str, list[int]] = {}  # published versions per name
    registered: list[str] = []
    manifests_updated: list[str] = []
    vmodels_set: dict[str, str] = {}
    vmodels_deleted: list[str] = []
    unregistered: list[str] = []
    deferred: list[str] = []
    frozen: dict[str, str] = {}
    ignored: list[str] = []
    failures: dict[str, str] = {}  # a step that failed (id -> error); retried next sync
    duration_s: float = 0.0


# ---------------------------------------------------------------------- the registry
class ModelRegistry(Protocol):
    """What the sync needs of the mesh's registry, one hook per step of a plan.

    Implemented by mesh.control.registry.MeshRegistry (over the store, with the commands to
    workers). A hook that fails raises MeshError or redis.RedisError; the sync reports it and
    retries the step next time, so each hook must be safe to repeat.
    """

    @property
    def settings(self) -> MeshSettings:
        """The mesh's settings: MESH_MODEL_DIR, the sync interval, the storage credentials."""
        ...

    def list_models(self) -> list[ModelRecord]:
        """Every registered model's record."""
        ...

    def list_vmodels(self) -> list[VModelRecord]:
        """Every vmodel's record."""
        ...

    def upsert_record(self, model_id: str, info: ModelInfo, manifest: ModelManifest) -> bool:
        """Register `model_id` with `manifest`, or attach/refresh the manifest of its record,
        atomically; an existing record keeps its info. FailedPrecondition when it is registered
        at another location. Returns whether anything changed."""
        ...

    def unregister_model(self, model_id: str) -> None:
        """Remove the model and unload its copies; idempotent. FailedPrecondition while a vmodel
        references it."""
        ...

    def set_vmodel(
        self,
        vmodel_id: str,
        target_model_id: str,
        *,
        auto_delete_target_model: bool = False,
        expected_target_model_id: str | None = None,
        owner: str | None = None,
    ) -> object:
        """Create the vmodel or set its target, starting the cutover without waiting for it; a
        compare-and-set against `expected_target_model_id` when given."""
        ...

    def delete_vmodel(self, vmodel_id: str, owner: str | None = None) -> None:
        """Delete the vmodel if `owner` owns it; idempotent."""
        ...

    def acquire_sync_lock(self, ttl_s: float) -> str | None:
        """Take the repository sync lock for `ttl_s` seconds: its token, or None while another
        sync holds it."""
        ...

    def release_sync_lock(self, token: str) -> None:
        """Release the lock if `token` still holds it."""
        ...


# ---------------------------------------------------------------------- repository sources
class RepositorySource(Protocol):
    description: str
    root_uri: str  # every version uri starts with it
    storage_key: str | None

    def list_files(self) -> list[RepoFile]: ...

    def read(self, relpath: str, max_bytes: int) -> bytes: ...

    def version_uri(self, name: str, version: int) -> str: ...


class LocalRepository:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.description = str(self.root)
        self.root_uri = f"file://{self.root}/"
        self.storage_key = None

    def list_files(self) -> list[RepoFile]:
        if not self.root.is_dir():
            raise InvalidArgument(f"model repository {self.root} is not a directory")
        out = []
        for path in sorted(self.root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue  # a symlink could point outside the repository: not followed
            rel = path.relative_to(self.root).as_posix()
            try:
                safe_relpath(rel)
            except InvalidArgument:
                continue
            out.append(RepoFile(rel, path.stat().st_size))
        return out

    def read(self, relpath: str, max_bytes: int) -> bytes:
        path = self.root / safe_relpath(relpath)
        if path.stat().st_size > max_bytes:
            raise InvalidArgument(f"{relpath} is larger than {max_bytes} bytes")
        return path.read_bytes()

    def version_uri(self, name: str, version: int) -> str:
        return f"file://{self.root}/{name}/{version}"


class S3Repository:
    def __init__(self, store: S3Store, bucket: str, prefix: str, storage_key: str | None) -> None:
        self.store, self.bucket = store, bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.storage_key = storage_key
        self.description = f"s3://{bucket}/{self.prefix}"
        self.root_uri = self.description

    def list_files(self) -> list[RepoFile]:
        out = []
        for o in self.store.list(self.bucket, self.prefix):
            # unsafe keys are kept: `scan` freezes the name they are under
            out.append(RepoFile(o.key[len(self.prefix) :], o.size, o.etag))
        return out

    def read(self, relpath: str, max_bytes: int) -> bytes:
        return self.store.read_bytes(self.bucket, self.prefix + safe_relpath(relpath), max_bytes)

    def version_uri(self, name: str, version: int) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}/{version}/"


def open_repository(model_dir: str, settings: MeshSettings, storage: Storage | None = None) -> RepositorySource:
    """The repository named by MESH_MODEL_DIR: a local path, file:///path or s3://bucket/prefix."""
    if model_dir.startswith("s3://"):
        bucket, _, prefix = model_dir[len("s3://") :].partition("/")
        if prefix:
            check_key(prefix, "MESH_MODEL_DIR prefix")
        loc = parse_location(f"s3://{bucket}/{prefix or '_'}", settings.model_dir_storage_key)
        store, bucket, _ = (storage or get_storage(settings)).resolve_s3(loc)
        return S3Repository(store, bucket, prefix, settings.model_dir_storage_key)
    if model_dir.startswith("file://"):
        model_dir = parse_location(model_dir).path
    if not model_dir.startswith("/"):
        raise InvalidArgument(f"MESH_MODEL_DIR {model_dir!r}: use an absolute path or s3://bucket/prefix")
    return LocalRepository(model_dir)


# ---------------------------------------------------------------------- the sync (I/O)
class _ManifestCache:
    """Parsed manifests by (path, etag/size): an unchanged S3 manifest is not read again."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str | None, int], ModelManifest | str] = {}

    def read(self, source: RepositorySource, files: Mapping[str, RepoFile], paths: list[str]) -> dict[str, ModelManifest | str]:
        out: dict[str, ModelManifest | str] = {}
        for path in paths:
            f = files[path]
            key = (source.description, path, f.etag, f.size)
            got = self._seen.get(key) if f.etag else None  # local files: always read (no etag)
            if got is None:
                try:
                    got = parse_manifest(source.read(path, MAX_MANIFEST_BYTES), path)
                except MeshError as exc:
                    got = str(exc)
                except OSError as exc:
                    got = f"{path}: {exc.strerror or exc}"
                if f.etag:
                    self._seen[key] = got
            out[path] = got
        if len(self._seen) > 10_000:
            self._seen.clear()
        return out


_manifests = _ManifestCache()


def sync_repository(
    registry: ModelRegistry, *, model_dir: str | None = None, source: RepositorySource | None = None
) -> SyncReport:
    """Make the registry match the repository once: register, cut over, unregister.

    With neither `model_dir` nor `source`, MESH_MODEL_DIR of the registry's settings; nothing is
    done (and an empty report returned) when none is set. Runs under the registry's sync lock: a
    sync that finds another one running does nothing (`skipped`).
    """
    settings = registry.settings
    model_dir = model_dir or settings.model_dir
    if source is None and not model_dir:
        return SyncReport(model_dir="", ok=True, error="MESH_MODEL_DIR is not set")
    token = registry.acquire_sync_lock(max(LOCK_TTL_MIN_S, 6 * settings.repository_sync_interval_s))
    if token is None:
        where = source.description if source else str(model_dir)
        return SyncReport(model_dir=where, skipped=True, error="another repository sync is running")
    try:
        return _sync_locked(registry, model_dir, source)
    finally:
        try:
            registry.release_sync_lock(token)
        except redis.RedisError as exc:  # the lock expires on its own
            log.warning("could not release the repository sync lock: %s", exc)


def _sync_locked(registry: ModelRegistry, model_dir: str | None, source: RepositorySource | None) -> SyncReport:
    started = time.monotonic()
    report = SyncReport(model_dir=source.description if source else str(model_dir))
    try:
        source = source or open_repository(str(model_dir), registry.settings)
        files = source.list_files()
        report.model_dir = source.description
        scanned = scan(files)
        by_path = {f.relpath: f for f in files}
        manifests = _manifests.read(source, by_path, scanned.manifest_paths())
        desired, frozen = desired_versions(scanned, manifests, source.version_uri, source.storage_key)
        records = registry.list_models()
        vmodels = registry.list_vmodels()
    except (MeshError, OSError, redis.RedisError) as exc:
        # never act on a listing we could not read: that would unregister everything
        report.ok = False
        report.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, MeshError) else str(exc)
        report.duration_s = time.monotonic() - started
        log.warning("repository sync of %s did nothing: %s", report.model_dir, report.error)
        return report

    plan = plan_sync(desired, records, vmodels, root_uri=source.root_uri, frozen=frozen)
    for d in desired:
        report.versions.setdefault(d.name, []).append(d.version)
    report.frozen, report.ignored, report.deferred = plan.frozen, scanned.ignored, plan.deferred
    apply_plan(registry, plan, report)
    report.duration_s = time.monotonic() - started
    if not plan.empty or plan.frozen:
        log.info(
            "repository sync of %s: registered %s, vmodels %s, deleted vmodels %s, "
            "unregistered %s, deferred %s, frozen %s, failures %s",
            report.model_dir, report.registered, report.vmodels_set, report.vmodels_deleted,
            report.unregistered, report.deferred, report.frozen, report.failures,
        )  # fmt: skip
    return report


def apply_plan(registry: ModelRegistry, plan: SyncPlan, report: SyncReport) -> SyncReport:
    """Carry out a plan, each step on its own: one failure is reported and retried next sync."""
    for reg in plan.registrations + plan.update_manifest:
        try:
            if registry.upsert_record(reg.model_id, reg.info, reg.manifest):
                (report.registered if reg in plan.registrations else report.manifests_updated).append(reg.model_id)
        except (MeshError, redis.RedisError) as exc:
            report.failures[reg.model_id] = str(exc)
    for change in plan.set_vmodel:
        if change.target_model_id in report.failures:
            continue
        try:
            registry.set_vmodel(
                change.vmodel_id,
                change.target_model_id,
                auto_delete_target_model=False,
                expected_target_model_id=change.expected_target_model_id,
                owner=REPO_OWNER,
            )
            report.vmodels_set[change.vmodel_id] = change.target_model_id
        except (MeshError, redis.RedisError) as exc:
            report.failures[f"vmodel:{change.vmodel_id}"] = str(exc)
    for vmodel_id in plan.delete_vmodel:
        try:
            registry.delete_vmodel(vmodel_id, owner=REPO_OWNER)
            report.vmodels_deleted.append(vmodel_id)
        except (MeshError, redis.RedisError) as exc:
            report.failures[f"vmodel:{vmodel_id}"] = str(exc)
    for model_id in plan.unregister:
        try:
            registry.unregister_model(model_id)
            report.unregistered.append(model_id)
        except FailedPrecondition:
            report.deferred.append(model_id)  # a vmodel took a reference meanwhile
        except (MeshError, redis.RedisError) as exc:
            report.failures[model_id] = str(exc)
    return report


# ---------------------------------------------------------------------- the task's body
def sync_from_app(app: Celery) -> SyncReport:
    """The `mesh.sync_repository` task body, run by a worker of the app's mesh: the repository
    and the credentials are this process's own MESH_MODEL_DIR and MESH_STORAGE_CONFIG, never
    a message's."""
    report = sync_repository(MeshRegistry.from_app(app))
    if not report.model_dir:
        log.warning("a repository sync was sent, but this worker has no MESH_MODEL_DIR: set it "
                    "on the workers as on beat (the repository is a worker setting)")  # fmt: skip
    return report
