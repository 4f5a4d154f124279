"""Reload snapshots (workers/snapshots.py): written once, read back much faster, never stale."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mesh.models import ModelInfo
from mesh.settings import MeshSettings
from mesh.tools.examples import train_digits_svm
from workers.runtimes import get_runtime
from workers.snapshots import Snapshots, snapshot_key


@pytest.fixture
def snaps(tmp_path) -> Snapshots:
    return Snapshots(MeshSettings(disk_cache_dir=str(tmp_path / "cache"), disk_cache_bytes=50 * 1024**2))


@pytest.fixture(scope="module")
def svm(tmp_path_factory):
    return train_digits_svm(tmp_path_factory.mktemp("svm") / "model.joblib")


def info(path) -> ModelInfo:
    return ModelInfo(runtime="sklearn", uri=f"file://{path}")


def test_a_snapshot_is_written_once_and_restores_the_same_model(snaps, svm):
    runtime = get_runtime("sklearn")
    first = runtime.load(svm, info(svm))
    assert snaps.restore(runtime, info(svm), svm, first.size_bytes) is None  # nothing written yet
    assert snaps.save(runtime, info(svm), svm, first.model)
    again = snaps.restore(runtime, info(svm), svm, first.size_bytes)
    assert again is not None and again.model is not first.model
    assert again.size_bytes == first.size_bytes and again.signature == first.signature
    x = np.random.default_rng(0).random((5, 64)) * 16
    assert again.runtime.predict(again.model, {"x": x})["predict"].tolist() == \
        first.runtime.predict(first.model, {"x": x})["predict"].tolist()
    assert [e.key for e in snaps.cache.entries()] == [snapshot_key(runtime, info(svm), svm)]


def test_a_changed_file_or_library_never_reads_an_old_snapshot(snaps, svm, tmp_path, monkeypatch):
    runtime = get_runtime("sklearn")
    path = tmp_path / "m.joblib"
    path.write_bytes(svm.read_bytes())
    loaded = runtime.load(path, info(path))
    assert snaps.save(runtime, info(path), path, loaded.model)
    assert snaps.restore(runtime, info(path), path, loaded.size_bytes) is not None
    later = time.time() + 5
    os.utime(path, (later, later))  # the file was replaced
    assert snaps.restore(runtime, info(path), path, loaded.size_bytes) is None
    os.utime(path, (later - 5, later - 5))
    monkeypatch.setattr(type(runtime), "snapshot_tag", lambda self: "sklearn 99.0")
    assert snaps.restore(runtime, info(path), path, loaded.size_bytes) is None


def test_a_damaged_snapshot_falls_back_to_the_files(snaps, svm, caplog):
    runtime = get_runtime("sklearn")
    loaded = runtime.load(svm, info(svm))
    snaps.save(runtime, info(svm), svm, loaded.model)
    lease = snaps.cache.lookup(snapshot_key(runtime, info(svm), svm))
    lease.path.write_bytes(b"not a pickle")
    lease.release()
    assert snaps.restore(runtime, info(svm), svm, loaded.size_bytes) is None
    assert "could not restore" in caplog.text


def test_off_unknown_size_or_no_support_means_no_snapshot(tmp_path, svm, snaps):
    off = Snapshots(MeshSettings(disk_cache_dir=str(tmp_path / "off"), reload_snapshots=False))
    runtime = get_runtime("sklearn")
    loaded = runtime.load(svm, info(svm))
    assert not off.save(runtime, info(svm), svm, loaded.model)
    snaps.save(runtime, info(svm), svm, loaded.model)
    assert snaps.restore(runtime, info(svm), svm, None) is None  # a first load measures its size
    onnx = get_runtime("onnx")
    assert not snaps.offered(onnx)


def test_lookup_never_waits_for_an_entry_being_written(tmp_path):
    import fcntl

    from mesh.storage.diskcache import DiskCache, _digest

    cache = DiskCache(tmp_path / "c", 1024**2)
    fd = os.open(tmp_path / "c" / "locks" / f"{_digest('k')}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is writing it
    try:
        assert cache.lookup("k") is None
    finally:
        os.close(fd)
    assert cache.lookup("k") is None  # and a key never written is a miss
