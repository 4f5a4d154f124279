"""The model repository's sync plan, pure: from a listing of the repository, its manifests and
the registry's records, what to register, cut over and unregister (docs/storage.md has the
layout). No I/O: mesh/control/repository.py lists the files, reads the manifests and applies
the plan.

Each published version is the concrete model `<name>@<version>`; the vmodel `<name>` (owner
`mesh-repository`) follows the highest published version through a normal vmodel cutover.
Versions that disappear (or lose their marker) are unregistered once no vmodel references them.
A problem under a name freezes that name: the plan never removes anything it cannot vouch for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from mesh.errors import InvalidArgument
from mesh.models import BatchingConfig, ModelInfo, ModelManifest, ModelRecord, VModelRecord
from mesh.protocol.ids import MAX_ID_BYTES, validate_id
from mesh.protocol.paths import safe_relpath

REPO_OWNER = "mesh-repository"  # owner of the vmodels the repository manages
READY_MARKER = "_READY"
MANIFEST_FILE = "mesh.json"
_VERSION = re.compile(r"^(0|[1-9][0-9]{0,17})$")
# \Z, not $: ids may hold a newline now, and `$` also matches before a final one ("x@1\n")
_REPO_ID = re.compile(r"^(?P<name>[^@]+)@(?P<version>0|[1-9][0-9]{0,17})\Z")
# Only unambiguous files tell the runtime: XGBoost's .json and LightGBM's .txt models need the
# manifest's `runtime` (docs/runtimes.md).
_RUNTIME_BY_SUFFIX = {".joblib": "sklearn", ".pkl": "sklearn", ".pickle": "sklearn", ".onnx": "onnx", ".ubj": "xgboost"}
_RUNTIME_BY_NAME = {"saved_model.pb": "tensorflow"}


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


# ---------------------------------------------------------------------- the plan
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
    # leaves room for "@<version>" (at most 18 digits) within the id limit
    return len(name.encode("utf-8")) <= MAX_ID_BYTES - 19


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
    kinds = {
        _RUNTIME_BY_NAME.get(Path(f.relpath).name) or _RUNTIME_BY_SUFFIX.get(Path(f.relpath).suffix.lower())
        for f in files
    } - {None}
    return kinds.pop() if len(kinds) == 1 else None


def desired_versions(
    scanned: Scan,
    manifests: Mapping[str, ModelManifest | str],
    version_uri: Callable[[str, int], str],
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


def _desired(vs: VersionScan, manifest: ModelManifest, version_uri: Callable[[str, int], str], storage_key: str | None) -> DesiredVersion:
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
            if d.model_id in by_id and not same_location(by_id[d.model_id].info, d.info)
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


def same_location(a: ModelInfo, b: ModelInfo) -> bool:
    """Whether two registrations name the same files (a trailing slash aside)."""
    return a.uri.rstrip("/") == b.uri.rstrip("/") and a.storage_key == b.storage_key


def _all_repo_targets(vm: VModelRecord, by_id: Mapping[str, ModelRecord], root_uri: str) -> bool:
    """A repository vmodel is deleted only if it still points at repository versions (or at
    nothing registered): one an operator pointed elsewhere by hand is left alone."""
    for mid in (vm.active_model_id, vm.target_model_id):
        rec = by_id.get(mid)
        if rec is not None and not is_repository_record(rec, root_uri):
            return False
    return True
