"""The model repository: layout scan, manifests, the pure sync plan (mesh/policy/repository.py),
a local directory end to end (mesh/control/repository.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.control.registry import MeshRegistry
from mesh.control.repository import LocalRepository, open_repository, sync_repository
from mesh.errors import InvalidArgument
from mesh.models import BatchingConfig, ModelInfo, ModelManifest, ModelRecord, VModelRecord
from mesh.policy.repository import (
    MANIFEST_FILE,
    READY_MARKER,
    REPO_OWNER,
    DesiredVersion,
    RepoFile,
    SyncPlan,
    desired_versions,
    merge_manifests,
    parse_manifest,
    plan_sync,
    scan,
    split_repo_id,
)
from mesh.settings import MeshSettings

ROOT = "file:///repo/"


def uri(name: str, version: int) -> str:
    return f"file:///repo/{name}/{version}"


def files(*paths: str) -> list[RepoFile]:
    return [RepoFile(p, 10) for p in paths]


def published(name: str, version: int, model: str = "model.joblib") -> list[str]:
    return [f"{name}/{version}/{model}", f"{name}/{version}/{READY_MARKER}"]


def desired_of(*paths: str, manifests: dict | None = None):
    return desired_versions(scan(files(*paths)), manifests or {}, uri)


# --- scan and manifests --------------------------------------------------------------------


def test_scan_groups_names_and_versions_and_ignores_the_rest():
    s = scan(
        files(
            *published("digits", 1),
            "digits/2/model.joblib",  # no marker: not published
            "digits/mesh.json",
            "digits/1/mesh.json",
            "digits/latest/model.joblib",  # not an integer version
            "digits/007/model.joblib",  # not canonical
            "digits/notes.txt",
            "README.md",
            "bad@name/1/model.joblib",
        )
    )
    d = s.names["digits"]
    assert d.has_manifest
    assert sorted(d.versions) == [1, 2]
    assert d.versions[1].published and d.versions[1].has_manifest
    assert [f.relpath for f in d.versions[1].files] == ["digits/1/model.joblib"]
    assert not d.versions[2].published
    assert s.ignored == ["README.md", "bad@name/", "digits/007/", "digits/latest/", "digits/notes.txt"]
    assert sorted(s.manifest_paths()) == ["digits/1/mesh.json", "digits/mesh.json"]


def test_only_published_versions_are_desired_with_runtime_inferred():
    desired, frozen = desired_of(*published("a", 1), *published("a", 2, "m.onnx"), "a/3/m.onnx")
    assert frozen == {}
    assert [(d.model_id, d.info.runtime, d.info.uri) for d in desired] == [
        ("a@1", "sklearn", uri("a", 1)),
        ("a@2", "onnx", uri("a", 2)),
    ]
    assert desired[0].info.size_bytes == 10
    assert desired[0].info.batching is None  # manifest values are not api values


def test_manifests_merge_version_over_name_field_by_field():
    base = parse_manifest(
        json.dumps({"runtime": "sklearn", "batching": {"max_batch_size": 8, "max_batch_delay_ms": 2}, "min_copies": 1}),
        "a/mesh.json",
    )
    own = parse_manifest(json.dumps({"batching": {"max_batch_size": 16}, "max_copies": 3}), "a/1/mesh.json")
    merged = merge_manifests(base, own)
    assert merged == ModelManifest(
        runtime="sklearn",
        batching=BatchingConfig(max_batch_size=16, max_batch_delay_ms=2),
        min_copies=1,
        max_copies=3,
    )
    assert merge_manifests(None, None) == ModelManifest()
    desired, _ = desired_of(
        *published("a", 1), "a/mesh.json", "a/1/mesh.json",
        manifests={"a/mesh.json": base, "a/1/mesh.json": own},
    )  # fmt: skip
    assert desired[0].manifest == merged


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"batching": {"max_batch_size": 0}}', "batching.max_batch_size"),
        ('{"runtime": "sklearn", "typo": 1}', "typo"),
        ('{"min_copies": 3, "max_copies": 1}', "min_copies"),
    ],
)
def test_bad_manifests_are_clear(raw, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_manifest(raw, "a/mesh.json")


def test_problems_freeze_their_name_only():
    desired, frozen = desired_of(
        *published("ok", 1),
        *published("broken", 1), "broken/mesh.json",
        *published("norun", 1, "weights.bin"),
        *published("py", 1, "weights.bin"), "py/1/mesh.json",
        "empty/1/_READY",
        manifests={"broken/mesh.json": "broken/mesh.json is not valid JSON", "py/1/mesh.json": ModelManifest(runtime="python")},
    )  # fmt: skip
    assert [d.model_id for d in desired] == ["ok@1"]
    assert set(frozen) == {"broken", "norun", "py", "empty"}
    assert "not valid JSON" in frozen["broken"]
    assert "runtime" in frozen["norun"]
    assert "python_class" in frozen["py"]
    assert "no model file" in frozen["empty"]


# --- the sync plan -------------------------------------------------------------------------


def record(model_id: str, manifest: ModelManifest | None = ModelManifest(), refs: int = 0, u: str | None = None) -> ModelRecord:
    name, version = split_repo_id(model_id) or (model_id, 0)
    info = ModelInfo(runtime="sklearn", uri=u or uri(name, version))
    return ModelRecord(model_id=model_id, info=info, manifest=manifest, refs=refs)


def vmodel(name: str, active: str, target: str | None = None, owner: str = REPO_OWNER) -> VModelRecord:
    return VModelRecord(vmodel_id=name, owner=owner, active_model_id=active, target_model_id=target or active)


def plan_for(paths, records=(), vmodels=(), manifests=None) -> SyncPlan:
    desired, frozen = desired_of(*paths, manifests=manifests)
    return plan_sync(desired, records, vmodels, root_uri=ROOT, frozen=frozen)


def test_fresh_repository_registers_every_version_and_points_vmodels_at_the_latest():
    plan = plan_for([*published("a", 1), *published("a", 2), *published("b", 5)])
    assert [r.model_id for r in plan.registrations] == ["a@1", "a@2", "b@5"]
    assert [(c.vmodel_id, c.target_model_id, c.expected_target_model_id) for c in plan.set_vmodel] == [
        ("a", "a@2", None),
        ("b", "b@5", None),
    ]
    assert plan.unregister == [] and plan.delete_vmodel == []


def test_in_sync_is_an_empty_plan():
    plan = plan_for(published("a", 1), [record("a@1")], [vmodel("a", "a@1")])
    assert plan.empty


def test_a_new_version_is_registered_and_cut_over_with_compare_and_set():
    plan = plan_for([*published("a", 1), *published("a", 2)], [record("a@1")], [vmodel("a", "a@1")])
    assert [r.model_id for r in plan.registrations] == ["a@2"]
    assert [(c.vmodel_id, c.target_model_id, c.expected_target_model_id) for c in plan.set_vmodel] == [
        ("a", "a@2", "a@1")
    ]
    assert plan.unregister == []  # old versions stay addressable while published


def test_a_removed_version_is_unregistered_once_unreferenced():
    plan = plan_for(published("a", 2), [record("a@1"), record("a@2")], [vmodel("a", "a@2")])
    assert plan.unregister == ["a@1"] and plan.deferred == []
    # still the active model of a transition: deferred to a later sync
    plan = plan_for(published("a", 2), [record("a@1"), record("a@2")], [vmodel("a", "a@1", "a@2")])
    assert plan.unregister == [] and plan.deferred == ["a@1"]
    # a vmodel of someone else references it: deferred too
    plan = plan_for(
        published("a", 2), [record("a@1"), record("a@2")], [vmodel("a", "a@2"), vmodel("pinned", "a@1", owner="")]
    )
    assert plan.deferred == ["a@1"]


def test_removing_the_latest_rolls_the_vmodel_back_and_drops_the_abandoned_target():
    plan = plan_for(published("a", 1), [record("a@1"), record("a@2")], [vmodel("a", "a@1", "a@2")])
    assert [(c.target_model_id, c.expected_target_model_id) for c in plan.set_vmodel] == [("a@1", "a@2")]
    assert plan.unregister == ["a@2"]  # after the retarget nothing references it


def test_a_name_removed_entirely_loses_its_vmodel_and_versions():
    plan = plan_for([], [record("a@1")], [vmodel("a", "a@1")])
    assert plan.delete_vmodel == ["a"] and plan.unregister == ["a@1"]


def test_records_the_repository_does_not_own_are_left_alone():
    api_model = ModelRecord(model_id="es_1", info=ModelInfo(runtime="sklearn", uri="file:///m/es_1.joblib"))
    other_repo = record("x@1", u="file:///other-repo/x/1")
    no_manifest = record("y@1", manifest=None)  # registered through the API, never adopted
    plan = plan_for([], [api_model, other_repo, no_manifest], [vmodel("es", "es_1", owner="")])
    assert plan.empty and plan.deferred == []


def test_an_api_registration_of_a_version_is_adopted_with_the_manifest():
    api = record("a@1", manifest=None)
    plan = plan_for(published("a", 1), [api], [])
    assert [r.model_id for r in plan.update_manifest] == ["a@1"] and plan.registrations == []
    changed = ModelManifest(batching=BatchingConfig(max_batch_size=4))
    plan = plan_for([*published("a", 1), "a/mesh.json"], [record("a@1")], [vmodel("a", "a@1")], {"a/mesh.json": changed})
    assert [(r.model_id, r.manifest) for r in plan.update_manifest] == [("a@1", changed)]


def test_conflicts_and_foreign_vmodels_freeze_the_name_and_nothing_is_removed():
    elsewhere = record("a@1", u="file:///elsewhere/a.joblib", manifest=None)
    plan = plan_for([*published("a", 1), *published("a", 2)], [elsewhere], [])
    assert "a" in plan.frozen and plan.empty
    plan = plan_for(published("b", 1), [record("b@1"), record("b@0")], [vmodel("b", "b@1", owner="alice")])
    assert "owner" in plan.frozen["b"] and plan.empty
    # a broken manifest never removes the versions already registered
    plan = plan_for(
        [*published("c", 2), "c/mesh.json"], [record("c@1")], [vmodel("c", "c@1")], {"c/mesh.json": "bad json"}
    )
    assert "c" in plan.frozen and plan.empty


# --- convergence, as a property ------------------------------------------------------------


def simulate(plan: SyncPlan, records: dict[str, ModelRecord], vmodels: dict[str, VModelRecord]) -> None:
    """Apply a plan to an in-memory registry; cutovers complete at once."""
    for reg in plan.registrations + plan.update_manifest:
        records[reg.model_id] = ModelRecord(model_id=reg.model_id, info=reg.info, manifest=reg.manifest)
    for c in plan.set_vmodel:
        vmodels[c.vmodel_id] = vmodel(c.vmodel_id, c.target_model_id)
    for v in plan.delete_vmodel:
        vmodels.pop(v)
    referenced = {m for vm in vmodels.values() for m in (vm.active_model_id, vm.target_model_id)}
    for m in plan.unregister:
        assert m not in referenced
        records.pop(m)


repo_states = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.dictionaries(st.integers(0, 5), st.booleans(), max_size=4),  # version -> published?
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(repo_states, min_size=1, max_size=4))
def test_sync_converges_to_the_repository(states):
    records: dict[str, ModelRecord] = {}
    vmodels: dict[str, VModelRecord] = {}
    for state in states:
        paths = []
        for name, versions in state.items():
            for version, is_published in versions.items():
                paths += published(name, version) if is_published else [f"{name}/{version}/model.joblib"]
        desired, frozen = desired_of(*paths)
        simulate(plan_sync(desired, records.values(), vmodels.values(), root_uri=ROOT, frozen=frozen), records, vmodels)
        again = plan_sync(desired, records.values(), vmodels.values(), root_uri=ROOT, frozen=frozen)
        simulate(again, records, vmodels)  # removals of models a retarget released
        final = plan_sync(desired, records.values(), vmodels.values(), root_uri=ROOT, frozen=frozen)
        assert final.empty and final.deferred == []
        want = {d.model_id for d in desired}
        assert set(records) == want
        latest: dict[str, DesiredVersion] = {}
        for d in desired:
            if d.name not in latest or d.version > latest[d.name].version:
                latest[d.name] = d
        assert {v: vm.target_model_id for v, vm in vmodels.items()} == {n: d.model_id for n, d in latest.items()}


# --- a local directory ---------------------------------------------------------------------


def registry_of(c) -> MeshRegistry:
    """The registry a sync writes to, from a client's own parts (its caches see the changes)."""
    return MeshRegistry(c.app, c.store, vmodels=c.vmodels, router=c.router)


def write_version(root: Path, name: str, version: int, payload: bytes = b"model", *, ready: bool = True, manifest: dict | None = None) -> None:
    d = root / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.joblib").write_bytes(payload)
    if manifest is not None:
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    if ready:
        (d / READY_MARKER).touch()


def test_local_repository_listing(tmp_path):
    root = tmp_path / "repo"
    write_version(root, "digits", 1, manifest={"batching": {"max_batch_size": 4}})
    write_version(root, "digits", 2, ready=False)
    (root / "digits" / "1" / "link.joblib").symlink_to("/etc/passwd")  # never followed
    repo = LocalRepository(root)
    listed = {f.relpath for f in repo.list_files()}
    assert listed == {"digits/1/model.joblib", "digits/1/mesh.json", "digits/1/_READY", "digits/2/model.joblib"}
    assert repo.version_uri("digits", 1) == f"file://{root.resolve()}/digits/1"
    assert repo.read("digits/1/mesh.json", 1024).startswith(b"{")
    with pytest.raises(InvalidArgument):
        repo.read("../outside", 1024)
    assert isinstance(open_repository(str(root), MeshSettings()), LocalRepository)
    assert isinstance(open_repository(f"file://{root}", MeshSettings()), LocalRepository)
    with pytest.raises(InvalidArgument):
        open_repository("relative/dir", MeshSettings())
    with pytest.raises(InvalidArgument):
        open_repository("s3://models/../x", MeshSettings())


def test_sync_a_local_repository_and_the_manifest_level_in_effective_config(client, tmp_path, svm_path):
    root = tmp_path / "repo"
    write_version(root, "digits", 1, svm_path.read_bytes(), manifest={"batching": {"max_batch_size": 4}})
    write_version(root, "digits", 2, svm_path.read_bytes(), ready=False)
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert report.ok and report.registered == ["digits@1"] and report.vmodels_set == {"digits": "digits@1"}
    assert report.versions == {"digits": [1]}
    cfg = client.get_effective_config("digits@1")
    assert (cfg.value("max_batch_size"), cfg.values["max_batch_size"].source) == (4, "manifest")
    assert cfg.values["max_batch_delay_ms"].source in ("global", "default")

    # the version is published: registered and the vmodel moves on (no copy: switch at once)
    (root / "digits" / "2" / READY_MARKER).touch()
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert report.registered == ["digits@2"] and report.vmodels_set == {"digits": "digits@2"}
    assert client.list_vmodels()[0].active_model_id == "digits@2"
    assert sync_repository(registry_of(client), model_dir=str(root)).registered == []  # idempotent

    # version 1 removed: unregistered (nothing references it)
    for p in sorted((root / "digits" / "1").iterdir()):
        p.unlink()
    os.rmdir(root / "digits" / "1")
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert report.unregistered == ["digits@1"]
    assert [r.model_id for r in client.list_models()] == ["digits@2"]

    # an API registration of a repository version wins over its manifest, field by field
    write_version(root, "other", 1, svm_path.read_bytes(), manifest={"batching": {"max_batch_size": 4, "max_batch_delay_ms": 9}})
    client.register_model(
        "other@1",
        ModelInfo(runtime="sklearn", uri=f"file://{root.resolve()}/other/1", batching=BatchingConfig(max_batch_size=2)),
    )
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert report.manifests_updated == ["other@1"]
    cfg = client.get_effective_config("other@1")
    assert (cfg.value("max_batch_size"), cfg.values["max_batch_size"].source) == (2, "api")
    assert (cfg.value("max_batch_delay_ms"), cfg.values["max_batch_delay_ms"].source) == (9, "manifest")

    # the whole repository gone unreadable: nothing is removed
    report = sync_repository(registry_of(client), model_dir=str(tmp_path / "missing"))
    assert not report.ok and "not a directory" in (report.error or "")
    assert {r.model_id for r in client.list_models()} == {"digits@2", "other@1"}


class MemoryRegistry:
    """A ModelRegistry in a dict: the sync needs nothing of the mesh but the protocol's hooks."""

    def __init__(self) -> None:
        self.settings = MeshSettings()
        self.records: dict[str, ModelRecord] = {}
        self.vmodels: dict[str, VModelRecord] = {}
        self.lock: str | None = None

    def list_models(self) -> list[ModelRecord]:
        return sorted(self.records.values(), key=lambda r: r.model_id)

    def list_vmodels(self) -> list[VModelRecord]:
        return sorted(self.vmodels.values(), key=lambda v: v.vmodel_id)

    def upsert_record(self, model_id: str, info: ModelInfo, manifest: ModelManifest) -> bool:
        old = self.records.get(model_id)
        if old is not None and old.manifest == manifest:
            return False
        self.records[model_id] = ModelRecord(model_id=model_id, info=old.info if old else info, manifest=manifest)
        return True

    def unregister_model(self, model_id: str) -> None:
        self.records.pop(model_id, None)

    def set_vmodel(self, vmodel_id, target_model_id, *, auto_delete_target_model=False, expected_target_model_id=None, owner=None):
        self.vmodels[vmodel_id] = vmodel(vmodel_id, target_model_id, owner=owner or "")  # the cutover completes at once

    def delete_vmodel(self, vmodel_id: str, owner: str | None = None) -> None:
        self.vmodels.pop(vmodel_id, None)

    def acquire_sync_lock(self, ttl_s: float) -> str | None:
        if self.lock is not None:
            return None
        self.lock = "token"
        return self.lock

    def release_sync_lock(self, token: str) -> None:
        if self.lock == token:
            self.lock = None


def test_sync_drives_any_model_registry(tmp_path):
    root = tmp_path / "repo"
    write_version(root, "digits", 1)
    registry = MemoryRegistry()
    report = sync_repository(registry, model_dir=str(root))
    assert report.registered == ["digits@1"] and report.vmodels_set == {"digits": "digits@1"}
    write_version(root, "digits", 2)
    report = sync_repository(registry, model_dir=str(root))
    assert report.registered == ["digits@2"] and registry.vmodels["digits"].active_model_id == "digits@2"
    report = sync_repository(registry, model_dir=str(root))
    assert report.registered == [] and report.unregistered == []  # digits@1 stays while published
    for p in sorted((root / "digits" / "1").iterdir()):
        p.unlink()
    assert sync_repository(registry, model_dir=str(root)).unregistered == ["digits@1"]
    assert registry.lock is None
    registry.lock = "another-sync"
    assert sync_repository(registry, model_dir=str(root)).skipped and registry.lock == "another-sync"


def test_a_key_escaping_its_version_freezes_the_name():
    s = scan([*files(*published("evil", 1), *published("fine", 1)), RepoFile("evil/1/../../../x.joblib", 1), RepoFile("../top", 1)])
    assert "escapes its root" in s.problems["evil"]
    assert "../top" in s.ignored
    desired, frozen = desired_versions(s, {}, uri)
    assert [d.model_id for d in desired] == ["fine@1"] and "evil" in frozen


def test_two_syncs_never_overlap(client, tmp_path, svm_path):
    root = tmp_path / "repo"
    write_version(root, "digits", 1, svm_path.read_bytes())
    client.store.r.set(client.keys.repository_lock, "another-sync", px=60_000)
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert report.skipped and report.registered == []
    assert client.store.r.get(client.keys.repository_lock) == b"another-sync"  # not ours to release
    client.store.r.delete(client.keys.repository_lock)
    report = sync_repository(registry_of(client), model_dir=str(root))
    assert not report.skipped and report.registered == ["digits@1"]
    assert client.store.r.get(client.keys.repository_lock) is None


def test_manifest_copy_bounds_reach_the_scheduler_and_effective_config(client, tmp_path, svm_path):
    from mesh.policy.precedence import copies_bounds

    root = tmp_path / "repo"
    (root / "pinned").mkdir(parents=True)
    (root / "pinned" / MANIFEST_FILE).write_text(json.dumps({"min_copies": 1, "max_copies": 3}))
    write_version(root, "pinned", 1, svm_path.read_bytes(), manifest={"max_copies": 2})
    assert sync_repository(registry_of(client), model_dir=str(root)).registered == ["pinned@1"]
    record = client.store.get_record("pinned@1")
    assert copies_bounds(record) == (1, 2)
    cfg = client.get_effective_config("pinned@1")
    assert (cfg.value("min_copies"), cfg.values["min_copies"].source) == (1, "manifest")
    assert (cfg.value("max_copies"), cfg.values["max_copies"].source) == (2, "manifest")
    # the api level wins
    api = record.model_copy(update={"info": record.info.model_copy(update={"min_copies": 0})})
    assert copies_bounds(api) == (0, 2)


def test_repository_names_may_be_utf8_ids_and_versions_parse_exactly():
    from mesh.policy.repository import split_repo_id, valid_name

    assert valid_name("模型") and valid_name("modèle 1") and valid_name("é" * 246)  # 492 bytes
    assert not valid_name("é" * 247) and not valid_name("a@b") and not valid_name("..")
    assert split_repo_id("模型@3") == ("模型", 3)
    assert split_repo_id("x@1\n") is None  # `$` would have matched before the newline
