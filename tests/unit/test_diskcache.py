"""The disk cache: atomic downloads, verification, LRU by bytes, pins, several processes."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument, ModelLoadFailed
from mesh.storage import diskcache
from mesh.storage.diskcache import DiskCache, Listing, RemoteFile, join_inside, safe_relpath


class FakeSource:
    """An in-memory source; counts listings and downloads (optionally in a file, across processes)."""

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        single: bool = False,
        md5: bool = True,
        corrupt: str | None = None,
        truncate: str | None = None,
        fail_after: str | None = None,
        counter: Path | None = None,
    ) -> None:
        self.files = files
        self.single = single
        self.md5 = md5
        self.corrupt, self.truncate, self.fail_after = corrupt, truncate, fail_after
        self.counter = counter
        self.listings = 0
        self.downloads: list[str] = []
        self.description = f"fake://{'+'.join(sorted(files))}"

    def listing(self) -> Listing:
        self.listings += 1
        if self.counter is not None:
            with open(self.counter, "a") as f:
                f.write("listing\n")
        return Listing(
            tuple(RemoteFile(rel, len(data), ref=rel) for rel, data in sorted(self.files.items())),
            single=self.single,
        )

    def download(self, file: RemoteFile, sink: Callable[[bytes], None]) -> str | None:
        self.downloads.append(file.relpath)
        data = self.files[file.relpath]
        expected = hashlib.md5(data).hexdigest() if self.md5 else None
        if file.relpath == self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if file.relpath == self.truncate:
            data = data[:-1]
        half = len(data) // 2
        sink(data[:half])
        if file.relpath == self.fail_after:
            raise ModelLoadFailed("connection reset mid-download")
        sink(data[half:])
        return expected


def data_bytes(root: Path) -> int:
    """Bytes of model data on disk: complete entries and downloads in progress."""
    total = 0
    for sub in ("entries", "tmp"):
        for p in (root / sub).rglob("*"):
            if p.is_file() and p.name != "meta.json":
                total += p.stat().st_size
    return total


def test_miss_downloads_then_hits_without_the_source(tmp_path):
    cache = DiskCache(tmp_path / "c", 10_000)
    src = FakeSource({"model.joblib": b"a" * 100, "sub/vocab.txt": b"b" * 10})
    with cache.acquire("k1", src) as lease:
        assert lease.path.is_dir()
        assert (lease.path / "model.joblib").read_bytes() == b"a" * 100
        assert (lease.path / "sub" / "vocab.txt").read_bytes() == b"b" * 10
    again = FakeSource({"model.joblib": b"zzz"})
    with cache.acquire("k1", again) as lease:
        assert (lease.path / "model.joblib").read_bytes() == b"a" * 100
    assert (src.listings, again.listings) == (1, 0)
    assert cache.used_bytes() == 110
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_single_file_lease_is_the_file(tmp_path):
    cache = DiskCache(tmp_path / "c", 10_000)
    with cache.acquire("k", FakeSource({"digits.onnx": b"onnx"}, single=True)) as lease:
        assert lease.path.is_file() and lease.path.name == "digits.onnx"
        assert lease.path.read_bytes() == b"onnx"


@pytest.mark.parametrize(
    "fault", [{"corrupt": "m.bin"}, {"truncate": "m.bin"}, {"fail_after": "m.bin"}]
)
def test_a_bad_download_leaves_nothing_behind(tmp_path, fault):
    cache = DiskCache(tmp_path / "c", 10_000)
    src = FakeSource({"a.bin": b"1" * 50, "m.bin": b"2" * 50}, **fault)
    with pytest.raises(ModelLoadFailed) as err:
        cache.acquire("k", src)
    assert "m.bin" in str(err.value) or "mid-download" in str(err.value)
    assert cache.entries() == []
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    # the next attempt downloads again and succeeds
    with cache.acquire("k", FakeSource({"a.bin": b"1" * 50, "m.bin": b"2" * 50})) as lease:
        assert (lease.path / "m.bin").read_bytes() == b"2" * 50


def test_md5_is_checked_when_the_source_gives_one(tmp_path):
    cache = DiskCache(tmp_path / "c", 10_000)
    with pytest.raises(ModelLoadFailed, match="MD5"):
        cache.acquire("k", FakeSource({"m.bin": b"x" * 20}, corrupt="m.bin"))
    # without an MD5 only the size is checked: a same-size corruption is not detectable
    with cache.acquire("k2", FakeSource({"m.bin": b"x" * 20}, corrupt="m.bin", md5=False)):
        pass


def test_lru_by_bytes_evicts_the_least_recently_used_entry(tmp_path):
    cache = DiskCache(tmp_path / "c", 250)
    entries = tmp_path / "c" / "entries"

    def age(key: str, t: float) -> None:
        (digest,) = [e.digest for e in cache.entries() if e.key == key]
        os.utime(entries / digest, (t, t))

    for key in ("a", "b"):
        cache.acquire(key, FakeSource({"m": key.encode() * 100})).release()
    age("a", 2000)
    age("b", 1000)
    cache.acquire("c", FakeSource({"m": b"c" * 100})).release()
    assert {e.key for e in cache.entries()} == {"a", "c"}
    age("a", 1000)
    age("c", 2000)
    cache.acquire("a", FakeSource({})).release()  # a hit makes a the most recently used
    cache.acquire("d", FakeSource({"m": b"d" * 100})).release()
    assert {e.key for e in cache.entries()} == {"a", "d"}
    assert cache.used_bytes() <= 250


def test_the_ledger_spares_the_scan_while_there_is_room_and_never_undercounts(tmp_path, monkeypatch):
    """A download that fits by the ledger does not read every entry's metadata; a missing or
    stale ledger is rebuilt by a scan, and evictions still keep the budget."""
    cache = DiskCache(tmp_path / "c", 250)
    cache.acquire("a", FakeSource({"m": b"a" * 100})).release()  # no ledger yet: scans, writes it
    ledger = tmp_path / "c" / "ledger"
    assert int(ledger.read_text()) == 100

    real_scan = cache._scan
    monkeypatch.setattr(cache, "_scan", lambda: pytest.fail("scanned although the ledger said it fits"))
    cache.acquire("b", FakeSource({"m": b"b" * 100})).release()
    assert int(ledger.read_text()) == 200
    monkeypatch.setattr(cache, "_scan", real_scan)

    ledger.unlink()  # lost (or written by a process that died): rebuilt from a scan
    cache.acquire("c", FakeSource({"m": b"c" * 100})).release()  # 300 > 250: evicts the oldest
    assert cache.used_bytes() <= 250
    assert int(ledger.read_text()) == cache.used_bytes()
    cache.evict_unused()
    assert int(ledger.read_text()) == cache.used_bytes() == 0


def test_entries_in_use_are_never_evicted_and_the_budget_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(diskcache, "ROOM_WAIT_S", 0.1)  # no room comes: fail soon
    cache = DiskCache(tmp_path / "c", 250)
    pinned = cache.acquire("a", FakeSource({"m": b"a" * 100}))
    cache.acquire("b", FakeSource({"m": b"b" * 100})).release()
    with cache.acquire("c", FakeSource({"m": b"c" * 100})):  # evicts b, not the pinned a
        assert {e.key for e in cache.entries()} == {"a", "c"}
        assert all(e.in_use for e in cache.entries())
        with pytest.raises(ModelLoadFailed, match="full"):
            cache.acquire("d", FakeSource({"m": b"d" * 100}))
        assert (pinned.path / "m").read_bytes() == b"a" * 100
        assert data_bytes(tmp_path / "c") <= 250
    pinned.release()
    pinned.release()  # idempotent
    cache.acquire("d", FakeSource({"m": b"d" * 100})).release()
    assert cache.used_bytes() <= 250


def test_a_download_waits_for_room_that_is_about_to_come(tmp_path):
    """A reload snapshot still being written (a download in progress) does not fail the next
    load's download: once written it is in use by nobody, and it is evicted for the load."""
    cache = DiskCache(tmp_path / "c", 250)
    pinned = cache.acquire("a", FakeSource({"m": b"a" * 100}))
    started, finish = threading.Event(), threading.Event()

    class Writing(FakeSource):
        def download(self, file, sink):
            started.set()
            finish.wait(10)
            return super().download(file, sink)

    writer = threading.Thread(target=lambda: cache.acquire("snap", Writing({"m": b"s" * 100})).release())
    writer.start()
    assert started.wait(10)
    threading.Timer(0.2, finish.set).start()
    with cache.acquire("b", FakeSource({"m": b"b" * 100})):  # 100 in use + 100 being written + 100 > 250
        assert {e.key for e in cache.entries()} == {"a", "b"}
        assert data_bytes(tmp_path / "c") <= 250
    writer.join(10)
    pinned.release()


def test_a_model_larger_than_the_budget_fails_clearly(tmp_path):
    cache = DiskCache(tmp_path / "c", 100)
    with pytest.raises(ModelLoadFailed, match="MESH_DISK_CACHE_BYTES"):
        cache.acquire("big", FakeSource({"m": b"x" * 101}))


@pytest.mark.parametrize(
    "bad", ["../evil", "/etc/passwd", "a/../../b", "a//b", "a/./b", "", "a\\b", "a\x00b", "a/"]
)
def test_paths_escaping_their_root_are_rejected(tmp_path, bad):
    with pytest.raises(InvalidArgument):
        safe_relpath(bad)
    cache = DiskCache(tmp_path / "c", 10_000)
    with pytest.raises(InvalidArgument):
        cache.acquire("k", FakeSource({bad: b"x"}))
    assert not (tmp_path / "evil").exists()
    assert cache.entries() == []


def test_join_inside_keeps_paths_under_the_root(tmp_path):
    assert join_inside(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    with pytest.raises(InvalidArgument):
        join_inside(tmp_path, "a/../../x")


def test_download_progress_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mesh.storage.diskcache")
    cache = DiskCache(tmp_path / "c", 10_000)
    cache.acquire("k", FakeSource({"m": b"x" * 100})).release()
    text = caplog.text
    assert "downloading fake://m: 1 file(s), 100 bytes" in text
    assert "downloaded fake://m: 100 bytes" in text


def test_a_dead_downloaders_reservation_and_files_are_reclaimed(tmp_path):
    cache = DiskCache(tmp_path / "c", 200)
    tmp = tmp_path / "c" / "tmp"
    (tmp / "deadbeef-1").mkdir()
    (tmp / "deadbeef-1" / "partial").write_bytes(b"x" * 150)
    (tmp / "deadbeef-1.lock").write_text(json.dumps({"size": 150}))  # nobody holds the lock
    cache.acquire("k", FakeSource({"m": b"y" * 150})).release()
    assert not (tmp / "deadbeef-1").exists() and not (tmp / "deadbeef-1.lock").exists()


# --- several processes on one host ------------------------------------------------------


def _acquire_in_child(root: str, capacity: int, key: str, payload: bytes, counter: str, hold: bool, q) -> None:
    cache = DiskCache(root, capacity)
    try:
        lease = cache.acquire(key, FakeSource({"m": payload}, counter=Path(counter)))
        q.put(("ok", (lease.path / "m").read_bytes() == payload))
        if not hold:
            lease.release()
    except Exception as exc:  # reported to the parent
        q.put(("error", f"{type(exc).__name__}: {exc}"))
    # with hold=True the process exits holding its lease: the OS releases the lock


def _run_children(args_list: list[tuple]) -> list[tuple]:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_acquire_in_child, args=(*a, q)) for a in args_list]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_several_processes_download_an_entry_once(tmp_path):
    root, counter = tmp_path / "c", tmp_path / "count"
    counter.touch()
    results = _run_children([(str(root), 10_000, "same", b"p" * 1000, str(counter), False)] * 4)
    assert results == [("ok", True)] * 4
    assert counter.read_text().count("listing") == 1
    assert len(DiskCache(root, 10_000).entries()) == 1


def test_several_processes_churning_keep_the_budget(tmp_path):
    root, counter = tmp_path / "c", tmp_path / "count"
    counter.touch()
    capacity = 350
    for round_ in range(3):
        args = [
            (str(root), capacity, f"m{round_}-{i}", bytes([i]) * 100, str(counter), False)
            for i in range(3)
        ]
        results = _run_children(args)
        assert results == [("ok", True)] * 3
        assert data_bytes(root) <= capacity
    assert DiskCache(root, capacity).used_bytes() <= capacity
    assert list((root / "tmp").iterdir()) == []


def test_a_process_that_dies_releases_its_pins(tmp_path):
    root, counter = tmp_path / "c", tmp_path / "count"
    counter.touch()
    assert _run_children([(str(root), 150, "held", b"h" * 100, str(counter), True)]) == [("ok", True)]
    cache = DiskCache(root, 150)
    assert [e.in_use for e in cache.entries()] == [False]
    cache.acquire("next", FakeSource({"m": b"n" * 100})).release()  # evicts the dead one's entry
    assert [e.key for e in cache.entries()] == ["next"]
