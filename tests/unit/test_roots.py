"""The trust boundary on the worker side: storage roots (mesh/storage/roots.py, Storage.local_file)
and the modules python-runtime classes may come from (workers/runtimes/python.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument, PermissionDenied
from mesh.settings import MeshSettings
from mesh.storage.roots import S3Root, default_roots, parse_roots
from mesh.storage.sources import Storage
from workers.runtimes.python import allowed_modules, check_python_class


def test_roots_parse_files_buckets_and_prefixes(tmp_path):
    roots = parse_roots(f" file://{tmp_path}/a , {tmp_path}/b, s3://models, s3://shared/team-a/ ")
    assert roots.files == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    assert roots.s3 == (S3Root("models"), S3Root("shared", "team-a"))
    assert not roots.unrestricted
    assert parse_roots("*").unrestricted
    for bad in ("relative/dir", "file://host/x", "s3://b!/x", "gs://bucket", "s3://bkt/../x", "*, s3://bkt"):
        with pytest.raises(InvalidArgument):
            parse_roots(bad)


def test_s3_roots_match_whole_path_segments():
    roots = parse_roots("s3://shared/team-a,s3://models")
    assert roots.allows_s3("shared", "team-a/m1/model.joblib")
    assert roots.allows_s3("shared", "team-a")
    assert roots.allows_s3("models", "anything/at/all")
    assert not roots.allows_s3("shared", "team-ab/m1")  # a prefix of the name, not a parent
    assert not roots.allows_s3("shared", "team-b/m1")
    assert not roots.allows_s3("other", "team-a/m1")


def test_default_roots_are_the_model_dir_and_the_configured_buckets(tmp_path):
    roots = default_roots(str(tmp_path), ["models", "more"])
    assert roots.files == (tmp_path.resolve(),) and roots.s3 == (S3Root("models"), S3Root("more"))
    assert default_roots("s3://repo/prefix", []).s3 == (S3Root("repo", "prefix"),)
    # nothing configured: no restriction (one-command local development; the worker warns)
    assert default_roots(None, []).unrestricted


def storage(tmp_path: Path, **settings) -> Storage:
    return Storage(MeshSettings(disk_cache_dir=str(tmp_path / "cache"), **settings))


def test_a_local_model_is_checked_after_resolving_links_and_before_it_is_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "m.joblib").write_bytes(b"inside")
    (outside / "evil.joblib").write_bytes(b"outside")
    (root / "link.joblib").symlink_to(outside / "evil.joblib")  # a link out of the root
    (root / "dirlink").symlink_to(outside)
    (outside / "back.joblib").symlink_to(root / "m.joblib")  # a link into the root
    s = storage(tmp_path, storage_roots=f"file://{root}")
    assert s.local_file(f"file://{root}/m.joblib") == (root / "m.joblib").resolve()
    assert s.local_file(f"file://{outside}/back.joblib") == (root / "m.joblib").resolve()
    for uri in (f"file://{outside}/evil.joblib", f"file://{root}/link.joblib", f"file://{root}/dirlink/evil.joblib",
                "file:///etc/passwd"):  # fmt: skip
        with pytest.raises(PermissionDenied, match="PERMISSION_DENIED: .* is outside this worker's storage roots"):
            s.local_file(uri)
        with pytest.raises(PermissionDenied):
            s.acquire(uri)
    # the same files without roots and with nothing configured: allowed (local development)
    assert storage(tmp_path).local_file(f"file://{outside}/evil.joblib") == (outside / "evil.joblib").resolve()


def test_the_model_dir_is_the_default_root(tmp_path):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.joblib").write_bytes(b"x")
    elsewhere.mkdir()
    (elsewhere / "x.joblib").write_bytes(b"x")
    s = storage(tmp_path, model_dir=str(repo))
    assert s.local_file(f"file://{repo}/m/1/model.joblib").name == "model.joblib"
    with pytest.raises(PermissionDenied, match="MESH_MODEL_DIR"):
        s.local_file(f"file://{elsewhere}/x.joblib")
    # a configured bucket joins the default roots; its entry's bucket is the only one it serves
    cfg = json.dumps({"k": {"type": "s3", "bucket": "models"}})
    assert storage(tmp_path, model_dir=str(repo), storage_config=cfg).roots.allows_s3("models", "a/b")


def test_python_classes_only_from_allowed_modules():
    allowed = allowed_modules(" tests.integration , tests.faults.fault_models ")
    assert allowed == ("tests.integration", "tests.faults.fault_models")
    check_python_class("tests.integration.pyclasses:Picky", allowed)  # a submodule
    check_python_class("tests.faults.fault_models:Slow", allowed)
    denied = [
        ("subprocess:Popen", "not in a module this worker allows"),
        ("netrc:netrc", "not in a module this worker allows"),
        ("tests.integrationX.mod:C", "not in a module this worker allows"),  # not a submodule
        # an allowed module lends out a class it imported: refused by where the class lives
        ("tests.faults.fault_models:Path", "defined outside the modules"),
    ]
    for spec, why in denied:
        with pytest.raises(PermissionDenied, match=why):
            check_python_class(spec, allowed)
    with pytest.raises(PermissionDenied, match="allows no python model modules"):
        check_python_class("tests.integration.pyclasses:Picky", allowed_modules(None))
