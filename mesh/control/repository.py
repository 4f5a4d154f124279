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

`plan_sync` is pure: from the repository's listing, the manifests and the registry it computes
what to change. `sync_repository` does the I/O (list, read manifests, apply the plan); the beat
scheduler runs it every MESH_REPOSITORY_SYNC_INTERVAL_S (task `mesh.sync_repository`).

Safety rule: a problem never removes anything. If the listing fails the sync changes nothing;
a problem under a name (an invalid manifest, no runtime, a conflicting registration, a vmodel
owned by someone else) freezes that name until it is fixed, and is reported.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from mesh.storage.diskcache import safe_relpath
from mesh.errors import FailedPrecondition, InvalidArgument, MeshError
from mesh.protocol.ids import validate_id
from mesh.models import BatchingConfig, ModelInfo, ModelManifest, ModelRecord, VModelRecord
from mesh.settings import MeshSettings
from mesh.storage.sources import S3Store, Storage, check_key, get_storage, parse_location

log = logging.getLogger("mesh.control.repository")

REPO_OWNER = "mesh-repository"  # owner of the vmodels the repository manages
READY_MARKER = "_READY"
MANIFEST_FILE = "mesh.json"
MAX_MANIFEST_BYTES = 64 * 1024
LOCK_TTL_MIN_S = 120.0  # the sync lock's lease (longer than the slowest sync)
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_VERSION = re.compile(r"^(0|[1-9][0-9]{0,17})$")
_REPO_ID = re.compile(r"^(?P<name>[^@]+)@(?P<version>0|[1-9][0-9]{0,17})$")
_RUNTIME_BY_SUFFIX = {".joblib": "sklearn", ".pkl": "sklearn", ".pickle": "sklearn", ".onnx": "onnx"}


# ---------------------------------------------------------------------- plain data
@dataclass(frozen=True)
class RepoFile:
    relpath: str  # '/'-separated, relative to the repository root
    size: int
    etag: str | None = None


@dataclass
class VersionScan:
    name: str
    version: int
    published: bool = False
    has_manifest: bool = False
    files: list[RepoFile] = field(default_factory=list)  # model files (no marker, no manifest)

    @property
    def model_id(self) -> str:
        return repo_model_id(self.name, self.version)


@dataclass
class NameScan:
    name: str
    has_manifest: bool = False
    versions: dict[int, VersionScan] = field(default_factory=dict)


@dataclass
class Scan:
    names: dict[str, NameScan] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # entries that are not part of the layout
    problems: dict[str, str] = field(default_factory=dict)  # name -> why it is frozen

    def manifest_paths(self) -> list[str]:
        """Manifests to read: every name's, and every published version's."""
        out = []
        for n in self.names.values():
            if n.has_manifest:
                out.append(f"{n.name}/{MANIFEST_FILE}")
            for v in n.versions.values():
                if v.published and v.has_manifest:
                    out.append(f"{n.name}/{v.version}/{MANIFEST_FILE}")
        return out


class DesiredVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    model_id: str
    info: ModelInfo
    manifest: ModelManifest


class Registration(BaseModel):
    model_id: str
    info: ModelInfo
    manifest: ModelManifest


class VModelChange(BaseModel):
    vmodel_id: str
    target_model_id: str
    expected_target_model_id: str | None = None  # compare-and-set against a concurrent change


class SyncPlan(BaseModel):
    registrations: list[Registration] = []
    update_manifest: list[Registration] = []
    set_vmodel: list[VModelChange] = []
    delete_vmodel: list[str] = []
    unregister: list[str] = []
    deferred: list[str] = []  # removed versions that a vmodel still references
    frozen: dict[str, str] = {}
    ignored: list[str] = []

    @property
    def empty(self) -> bool:
        return not (
            self.registrations or self.update_manifest or self.set_vmodel or self.delete_vmodel or self.unregister
        )


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


# ---------------------------------------------------------------------- pure logic
def repo_model_id(name: str, version: int) -> str:
    return f"{name}@{version}"


def split_repo_id(model_id: str) -> tuple[str, int] | None:
    m = _REPO_ID.match(model_id)
    return (m["name"], int(m["version"])) if m else None


def valid_name(name: str) -> bool:
    if "@" in name or name in (".", ".."):
        return False
    try:
        validate_id(name)
    except InvalidArgument:
        return False
    return len(name) <= 180  # leaves room for "@<version>" within the 200-character id limit


def scan(files: Iterable[RepoFile]) -> Scan:
    """Group a flat listing into names and versions (pure)."""
    out = Scan()
    ignored: set[str] = set()
    for f in files:
        parts = f.relpath.split("/")
        name = parts[0]
        try:
            safe_relpath(f.relpath)
        except InvalidArgument as exc:
            # e.g. an S3 key "digits/3/../../x": its version must not be served at all
            if len(parts) > 1 and valid_name(name):
                out.problems[name] = f"{f.relpath!r} escapes its root ({exc})"
            else:
                ignored.add(f.relpath)
            continue
        if len(parts) == 1:
            ignored.add(name)  # a file at the top level
            continue
        if not valid_name(name):
            ignored.add(name + "/")
            continue
        ns = out.names.setdefault(name, NameScan(name))
        if len(parts) == 2:
            if parts[1] == MANIFEST_FILE:
                ns.has_manifest = True
            else:
                ignored.add(f.relpath)
            continue
        vdir = parts[1]
        if not _VERSION.match(vdir):
            ignored.add(f"{name}/{vdir}/")
            continue
        vs = ns.versions.setdefault(int(vdir), VersionScan(name, int(vdir)))
        rest = "/".join(parts[2:])
        if rest == READY_MARKER:
            vs.published = True
        elif rest == MANIFEST_FILE:
            vs.has_manifest = True
        else:
            vs.files.append(f)
    out.ignored = sorted(ignored)
    return out


def parse_manifest(raw: bytes | str, where: str) -> ModelManifest:
    """A manifest file's contents; InvalidArgument naming the file and the bad fields."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not valid JSON: {exc}") from None
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"{where}: {problems}") from None


def merge_manifests(base: ModelManifest | None, override: ModelManifest | None) -> ModelManifest:
    """The version's manifest over the name's, field by field (batching too)."""
    a = base.model_dump(exclude_none=True) if base else {}
    b = override.model_dump(exclude_none=True) if override else {}
    batching = {**a.pop("batching", {}), **b.pop("batching", {})}
    merged = {**a, **b}
    if batching:
        merged["batching"] = BatchingConfig(**batching)
    return ModelManifest(**merged)


def infer_runtime(files: Iterable[RepoFile]) -> str | None:
    kinds = {_RUNTIME_BY_SUFFIX.get(Path(f.relpath).suffix.lower()) for f in files} - {None}
    return kinds.pop() if len(kinds) == 1 else None


def desired_versions(
    scanned: Scan,
    manifests: Mapping[str, ModelManifest | str],
    version_uri: Any,
    storage_key: str | None = None,
) -> tuple[list[DesiredVersion], dict[str, str]]:
    """The published versions as models to register, and the names frozen by a problem (pure).

    `manifests` maps a manifest path to its parsed manifest, or to the error reading it;
    `version_uri(name, version)` gives the model uri of a version directory.
    """
    desired: list[DesiredVersion] = []
    frozen: dict[str, str] = dict(scanned.problems)
    for name, ns in sorted(scanned.names.items()):
        if name in frozen:
            continue
        try:
            base = _manifest_at(manifests, f"{name}/{MANIFEST_FILE}") if ns.has_manifest else None
            found = []
            for version, vs in sorted(ns.versions.items()):
                if not vs.published:
                    continue  # not (yet) published: invisible
                path = f"{name}/{version}/{MANIFEST_FILE}"
                own = _manifest_at(manifests, path) if vs.has_manifest else None
                manifest = merge_manifests(base, own)
                found.append(_desired(vs, manifest, version_uri, storage_key))
        except InvalidArgument as exc:
            frozen[name] = str(exc)
            continue
        desired.extend(found)
    return desired, frozen


def _manifest_at(manifests: Mapping[str, ModelManifest | str], path: str) -> ModelManifest:
    got = manifests.get(path)
    if got is None:
        raise InvalidArgument(f"{path} could not be read")
    if isinstance(got, str):
        raise InvalidArgument(got)
    return got


def _desired(vs: VersionScan, manifest: ModelManifest, version_uri: Any, storage_key: str | None) -> DesiredVersion:
    where = f"{vs.name}/{vs.version}"
    if not vs.files:
        raise InvalidArgument(f"{where} is published ({READY_MARKER}) but holds no model file")
    model_id = repo_model_id(vs.name, vs.version)
    validate_id(model_id)
    runtime = manifest.runtime or infer_runtime(vs.files)
    if runtime is None:
        raise InvalidArgument(
            f"{where}: cannot tell the runtime from its files; set \"runtime\" in {MANIFEST_FILE}"
        )
    if runtime == "python" and not manifest.python_class:
        raise InvalidArgument(f"{where}: runtime 'python' needs \"python_class\" in {MANIFEST_FILE}")
    info = ModelInfo(
        runtime=runtime,
        uri=version_uri(vs.name, vs.version),
        storage_key=storage_key,
        python_class=manifest.python_class if runtime == "python" else None,
        size_bytes=sum(f.size for f in vs.files),
    )
    return DesiredVersion(name=vs.name, version=vs.version, model_id=model_id, info=info, manifest=manifest)


def is_repository_record(record: ModelRecord, root_uri: str) -> bool:
    """Records the repository registered (or adopted): `<name>@<int>`, a manifest, under its root."""
    return (
        record.manifest is not None
        and split_repo_id(record.model_id) is not None
        and record.info.uri.startswith(root_uri)
    )


def plan_sync(
    desired: Iterable[DesiredVersion],
    records: Iterable[ModelRecord],
    vmodels: Iterable[VModelRecord],
    *,
    root_uri: str,
    frozen: Mapping[str, str] = {},
    owner: str = REPO_OWNER,
) -> SyncPlan:
    """What to change so the registry matches the repository (pure).

    - a published version not registered: register it (with its manifest);
    - registered with the same location: adopt it / refresh its manifest if it changed (an API
      registration keeps its own ModelInfo, which wins over the manifest field by field);
    - registered with another location: a conflict, the name is frozen;
    - vmodel `<name>`: created on the latest version, or retargeted to it (a normal cutover);
      one owned by someone else freezes the name;
    - a name with no published version left: its vmodel is deleted;
    - a repository version no longer published: unregistered once no vmodel references it
      (after this plan's vmodel changes), else deferred to a later sync.
    """
    frozen = dict(frozen)
    by_id = {r.model_id: r for r in records}
    vms = {v.vmodel_id: v for v in vmodels}
    by_name: dict[str, list[DesiredVersion]] = {}
    for d in desired:
        by_name.setdefault(d.name, []).append(d)

    plan = SyncPlan()
    for name, versions in sorted(by_name.items()):
        if name in frozen:
            continue
        vm = vms.get(name)
        if vm is not None and vm.owner != owner:
            frozen[name] = f"vmodel {name!r} exists with owner {vm.owner!r}; the repository does not take it over"
            continue
        conflicts = [
            d.model_id for d in versions
            if d.model_id in by_id and not _same_location(by_id[d.model_id].info, d.info)
        ]  # fmt: skip
        if conflicts:
            frozen[name] = (
                f"{', '.join(conflicts)} already registered with another location; "
                "unregister it or remove the version from the repository"
            )
            continue
        for d in versions:
            rec = by_id.get(d.model_id)
            reg = Registration(model_id=d.model_id, info=d.info, manifest=d.manifest)
            if rec is None:
                plan.registrations.append(reg)
            elif rec.manifest != d.manifest:
                plan.update_manifest.append(reg)
        latest = max(versions, key=lambda d: d.version).model_id
        if vm is None:
            plan.set_vmodel.append(VModelChange(vmodel_id=name, target_model_id=latest))
        elif vm.target_model_id != latest:
            plan.set_vmodel.append(
                VModelChange(vmodel_id=name, target_model_id=latest, expected_target_model_id=vm.target_model_id)
            )

    # references once this plan's vmodel changes are applied
    retarget = {c.vmodel_id: c.target_model_id for c in plan.set_vmodel}
    for vm in vms.values():
        if vm.owner == owner and vm.vmodel_id not in by_name and vm.vmodel_id not in frozen:
            if _all_repo_targets(vm, by_id, root_uri):
                plan.delete_vmodel.append(vm.vmodel_id)
    referenced: set[str] = set()
    for vm in vms.values():
        if vm.vmodel_id in plan.delete_vmodel:
            continue
        referenced.add(vm.active_model_id)
        referenced.add(retarget.get(vm.vmodel_id, vm.target_model_id))

    wanted = {d.model_id for ds in by_name.values() for d in ds}
    for rec in sorted(by_id.values(), key=lambda r: r.model_id):
        if rec.model_id in wanted or not is_repository_record(rec, root_uri):
            continue
        name = split_repo_id(rec.model_id)[0]  # type: ignore[index]
        if name in frozen:
            continue
        (plan.deferred if rec.model_id in referenced else plan.unregister).append(rec.model_id)
    plan.frozen = frozen
    return plan


def _same_location(a: ModelInfo, b: ModelInfo) -> bool:
    return a.uri.rstrip("/") == b.uri.rstrip("/") and a.storage_key == b.storage_key


def _all_repo_targets(vm: VModelRecord, by_id: Mapping[str, ModelRecord], root_uri: str) -> bool:
    """A repository vmodel is deleted only if it still points at repository versions (or at
    nothing registered): one an operator pointed elsewhere by hand is left alone."""
    for mid in (vm.active_model_id, vm.target_model_id):
        rec = by_id.get(mid)
        if rec is not None and not is_repository_record(rec, root_uri):
            return False
    return True


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


def read_vmodels(client: Any) -> list[VModelRecord]:
    return list(client.list_vmodels())


def sync_repository(
    client: Any, *, model_dir: str | None = None, source: RepositorySource | None = None
) -> SyncReport:
    """Make the registry match the repository once: register, cut over, unregister.

    `client` is a MeshClient. With neither `model_dir` nor `source`, MESH_MODEL_DIR of the
    client's settings; nothing is done (and an empty report returned) when none is set.
    Runs under a Redis lock: a sync that finds another one running does nothing (`skipped`).
    """
    settings: MeshSettings = client.settings
    model_dir = model_dir or settings.model_dir
    if source is None and not model_dir:
        return SyncReport(model_dir="", ok=True, error="MESH_MODEL_DIR is not set")
    r, lock = client.store.r, client.keys.repository_lock
    token = uuid.uuid4().hex
    ttl_ms = int(max(LOCK_TTL_MIN_S, 6 * settings.repository_sync_interval_s) * 1000)
    if not r.set(lock, token, nx=True, px=ttl_ms):
        where = source.description if source else str(model_dir)
        return SyncReport(model_dir=where, skipped=True, error="another repository sync is running")
    try:
        return _sync_locked(client, model_dir, source)
    finally:
        try:
            r.eval(_RELEASE_LUA, 1, lock, token)
        except redis.RedisError as exc:  # the lock expires on its own
            log.warning("could not release the repository sync lock: %s", exc)


def _sync_locked(client: Any, model_dir: str | None, source: RepositorySource | None) -> SyncReport:
    started = time.monotonic()
    settings: MeshSettings = client.settings
    report = SyncReport(model_dir=source.description if source else str(model_dir))
    try:
        source = source or open_repository(str(model_dir), settings)
        files = source.list_files()
        report.model_dir = source.description
        scanned = scan(files)
        by_path = {f.relpath: f for f in files}
        manifests = _manifests.read(source, by_path, scanned.manifest_paths())
        desired, frozen = desired_versions(scanned, manifests, source.version_uri, source.storage_key)
        records = client.list_models()
        vmodels = read_vmodels(client)
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
    apply_plan(client, plan, report)
    report.duration_s = time.monotonic() - started
    if not plan.empty or plan.frozen:
        log.info(
            "repository sync of %s: registered %s, vmodels %s, deleted vmodels %s, "
            "unregistered %s, deferred %s, frozen %s, failures %s",
            report.model_dir, report.registered, report.vmodels_set, report.vmodels_deleted,
            report.unregistered, report.deferred, report.frozen, report.failures,
        )  # fmt: skip
    return report


def apply_plan(client: Any, plan: SyncPlan, report: SyncReport) -> SyncReport:
    """Carry out a plan, each step on its own: one failure is reported and retried next sync."""
    for reg in plan.registrations + plan.update_manifest:
        try:
            if upsert_repository_record(client, reg):
                (report.registered if reg in plan.registrations else report.manifests_updated).append(reg.model_id)
        except (MeshError, redis.RedisError) as exc:
            report.failures[reg.model_id] = str(exc)
    for change in plan.set_vmodel:
        if change.target_model_id in report.failures:
            continue
        try:
            kwargs: dict[str, Any] = {"auto_delete_target_model": False, "owner": REPO_OWNER}
            if change.expected_target_model_id is not None:
                kwargs["expected_target_model_id"] = change.expected_target_model_id
            client.set_vmodel(change.vmodel_id, change.target_model_id, **kwargs)
            report.vmodels_set[change.vmodel_id] = change.target_model_id
        except (MeshError, redis.RedisError) as exc:
            report.failures[f"vmodel:{change.vmodel_id}"] = str(exc)
    for vmodel_id in plan.delete_vmodel:
        try:
            _delete_vmodel(client, vmodel_id)
            report.vmodels_deleted.append(vmodel_id)
        except (MeshError, redis.RedisError) as exc:
            report.failures[f"vmodel:{vmodel_id}"] = str(exc)
    for model_id in plan.unregister:
        try:
            client.unregister_model(model_id)
            report.unregistered.append(model_id)
        except FailedPrecondition:
            report.deferred.append(model_id)  # a vmodel took a reference meanwhile
        except (MeshError, redis.RedisError) as exc:
            report.failures[model_id] = str(exc)
    return report


def _delete_vmodel(client: Any, vmodel_id: str) -> None:
    client.delete_vmodel(vmodel_id, owner=REPO_OWNER)


def upsert_repository_record(client: Any, reg: Registration) -> bool:
    """Register a version with its manifest, or attach/refresh the manifest of its record, in
    one WATCH/MULTI step. An existing record keeps its ModelInfo (an API registration's values
    win over the manifest). Returns whether anything changed."""
    r = client.store.r
    key = client.keys.models
    validate_id(reg.model_id)
    with r.pipeline() as p:
        while True:
            try:
                p.watch(key)
                raw = p.hget(key, reg.model_id)
                if raw is None:
                    rec = ModelRecord(model_id=reg.model_id, info=reg.info, manifest=reg.manifest)
                else:
                    rec = ModelRecord.model_validate_json(raw)
                    if not _same_location(rec.info, reg.info):
                        raise FailedPrecondition(
                            f"model {reg.model_id!r} is registered with another location"
                        )
                    if rec.manifest == reg.manifest:
                        p.reset()
                        return False
                    rec.manifest = reg.manifest
                p.multi()
                p.hset(key, reg.model_id, rec.model_dump_json())
                p.execute()
                return True
            except redis.WatchError:
                continue


# ---------------------------------------------------------------------- the task's body
_clients: dict[tuple[str, str], Any] = {}


def sync_from_app(app: Any, model_dir: str | None = None) -> SyncReport:
    """The `mesh.sync_repository` task body, run by a worker of the app's mesh.

    `model_dir` comes from the beat (its MESH_MODEL_DIR); the credentials are this process's
    own MESH_STORAGE_CONFIG, never a message's.
    """
    from mesh.client import MeshClient
    from mesh.settings import get_settings

    conf = app.conf
    key = (conf.mesh_prefix, conf.mesh_redis_backend_url)
    client = _clients.get(key)
    if client is None:
        base = get_settings()
        if (base.prefix, base.redis_url) == key:
            settings = base
        else:
            settings = base.model_copy(update={"prefix": conf.mesh_prefix, "redis_url": conf.mesh_redis_backend_url})
        client = _clients[key] = MeshClient(settings=settings)
    return sync_repository(client, model_dir=model_dir)
