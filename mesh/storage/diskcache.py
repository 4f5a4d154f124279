"""The per-host disk cache of downloaded model files: LRU bounded by bytes, shared by processes.

Several worker processes on one host share one cache directory. Coordination is by `fcntl.flock`
only (no daemon, nothing in Redis), so a process that dies releases everything it held:

    <root>/cache.lock            global lock: admission, eviction and commit are serialized
    <root>/locks/<digest>.lock   one per entry, never deleted (a stable inode to lock):
                                 SHARED while the entry is in use (a pin), EXCLUSIVE while it is
                                 downloaded or evicted
    <root>/entries/<digest>/     a complete entry: meta.json + data/ (renamed in atomically)
    <root>/tmp/<token>/          a download in progress (or a deleted entry being removed)
    <root>/tmp/<token>.lock      its byte reservation, held EXCLUSIVE by the downloader
    <root>/ledger                bytes of complete entries, never less than the truth (below)

Guarantees:
- Never a partial file: a download goes to tmp/, every file's size (and MD5 where the source
  gives one) is verified, then the directory is renamed into entries/ in one step.
- The budget holds: bytes of complete entries plus reservations of running downloads never
  exceed `capacity_bytes` (data bytes; the small meta and lock files are not counted). A
  download that cannot fit without evicting an entry in use, or room held by other downloads,
  fails with a clear error once that has lasted ROOM_WAIT_S.
- Never evicts an entry in use: a lease holds a shared lock on the entry's lock file until it
  is released; eviction takes the exclusive lock without waiting and skips entries it cannot
  get. A worker keeps the lease of each loaded model until it unloads it.
- Single flight across processes: the second process wanting an entry that is being downloaded
  waits for the first, then uses its result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.errors import InvalidArgument, ModelLoadFailed
from mesh.protocol.paths import safe_relpath

log = logging.getLogger("mesh.storage.diskcache")

PROGRESS_EVERY_S = 2.0
# A download that finds no room waits this long for some before it fails: what is in the way is
# often about to go. A worker answers a load's first requests, and its next load arrives, while
# that load's reload snapshot is still being written (then in use by nobody) and its victim's
# files are still pinned until the victim's retirement ends.
ROOM_WAIT_S = 2.0
_CHUNK = 1024 * 1024


def join_inside(root: Path, rel: str) -> Path:
    """root/rel, checked again after normalisation (belt and braces over `safe_relpath`)."""
    safe_relpath(rel)
    path = Path(os.path.normpath(root / rel))
    if os.path.commonpath([str(root), str(path)]) != str(root):
        raise InvalidArgument(f"path {rel!r} escapes its root")
    return path


@dataclass(frozen=True)
class RemoteFile:
    relpath: str  # '/'-separated, below the entry's root
    size: int
    ref: str = ""  # the source's own name for it (e.g. the full S3 key)
    etag: str | None = None  # the source's version tag, handed back to `download`


@dataclass(frozen=True)
class Listing:
    files: tuple[RemoteFile, ...]
    single: bool  # one file: the lease's path is that file; otherwise the directory

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Source(Protocol):
    """What the cache downloads from (mesh/storage/sources.py's S3Source)."""

    description: str  # for logs and errors; never holds credentials

    def listing(self) -> Listing: ...

    def download(self, file: RemoteFile, sink: Callable[[bytes], None]) -> str | None:
        """Stream the file's bytes into `sink`; return its expected MD5 (hex) if known."""
        ...


@dataclass(frozen=True)
class EntryInfo:
    key: str
    digest: str
    size: int
    last_used: float
    in_use: bool


class CacheLease:
    """A pin on a cache entry: it is not evicted until `release()` (or the process exits)."""

    def __init__(self, path: Path, key: str, fd: int | None) -> None:
        self.path = path
        self.key = key
        self._fd = fd
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def released(self) -> bool:
        return self._fd is None

    def __enter__(self) -> CacheLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lost lease must not pin an entry forever
        with contextlib.suppress(Exception):
            self.release()


class DiskCache:
    def __init__(self, root: Path | str, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise InvalidArgument("disk cache capacity must be positive")
        self.root = Path(os.path.abspath(root))
        self.capacity = int(capacity_bytes)
        self._entries = self.root / "entries"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        for d in (self._entries, self._locks, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ public
    def acquire(self, key: str, source: Source) -> CacheLease:
        """A leased local copy of `source`, downloading it on a miss."""
        digest = _digest(key)
        fd = os.open(self._locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # An entry just downloaded can (rarely) be evicted in the instant the downloader
            # turns its exclusive lock into a shared one, if everything older is in use.
            for _ in range(3):
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a download or eviction of this entry
                lease = self._hit(key, digest, fd)
                if lease is not None:
                    return lease
                fcntl.flock(fd, fcntl.LOCK_EX)  # single flight: one downloader per entry
                if self._entry_dir(digest).is_dir():
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    continue
                self._download(key, digest, source)
                fcntl.flock(fd, fcntl.LOCK_SH)
                lease = self._hit(key, digest, fd)
                if lease is not None:
                    return lease
            raise ModelLoadFailed(
                f"{source.description}: evicted from the disk cache as soon as it was downloaded "
                f"(MESH_DISK_CACHE_BYTES={self.capacity} is too small for the models in use)"
            )
        except BaseException:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise

    def lookup(self, key: str) -> CacheLease | None:
        """A lease on `key`'s entry if it is complete now, else None: never downloads, and
        never waits for a download or an eviction of it in progress."""
        digest = _digest(key)
        fd = os.open(self._locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            lease = self._hit(key, digest, fd)
        except BaseException:
            lease = None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        if lease is None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return lease

    def entries(self) -> list[EntryInfo]:
        """Complete entries, least recently used first (for status and tests)."""
        out = []
        for digest, meta, mtime in self._scan():
            out.append(
                EntryInfo(
                    key=str(meta.get("key", "")),
                    digest=digest,
                    size=int(meta.get("size", 0)),
                    last_used=mtime,
                    in_use=self._in_use(digest),
                )
            )
        return out

    def used_bytes(self) -> int:
        return sum(int(meta.get("size", 0)) for _, meta, _ in self._scan())

    def evict_unused(self) -> int:
        """Remove every entry not in use; returns the bytes freed."""
        freed = 0
        with self._global_lock():
            entries = self._scan()
            for digest, meta, _ in entries:
                if self._try_evict(digest):
                    freed += int(meta.get("size", 0))
            self._write_ledger(sum(int(m.get("size", 0)) for _, m, _ in entries) - freed)
        return freed

    # ------------------------------------------------------------------ internals
    def _entry_dir(self, digest: str) -> Path:
        return self._entries / digest

    def _hit(self, key: str, digest: str, fd: int) -> CacheLease | None:
        entry = self._entry_dir(digest)
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != key:  # a digest collision: treat as a miss (never serve it)
            raise ModelLoadFailed(f"disk cache entry {digest} belongs to another key")
        with contextlib.suppress(OSError):
            os.utime(entry)  # LRU: mtime of the entry directory is its last use
        data = entry / "data"
        path = join_inside(data, meta["files"][0]["relpath"]) if meta.get("single") else data
        return CacheLease(path, key, fd)

    def _download(self, key: str, digest: str, source: Source) -> None:
        listing = source.listing()
        for f in listing.files:
            safe_relpath(f.relpath, f"file {f.relpath!r} of {source.description}")
        if not listing.files:
            raise ModelLoadFailed(f"{source.description}: nothing to download")
        total = listing.size
        if total > self.capacity:
            raise ModelLoadFailed(
                f"{source.description} is {total} bytes, more than the disk cache budget of "
                f"{self.capacity} bytes (MESH_DISK_CACHE_BYTES)"
            )
        token = f"{digest}-{uuid.uuid4().hex[:12]}"
        work = self._tmp / token
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            with self._global_lock():
                try:
                    self._make_room(total, source.description)
                except ModelLoadFailed:
                    if time.monotonic() >= deadline:
                        raise
                else:
                    rfd = os.open(self._tmp / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    fcntl.flock(rfd, fcntl.LOCK_EX)
                    os.write(rfd, json.dumps({"size": total, "key": key}).encode())
                    break
            time.sleep(0.01)  # outside the lock: what is in the way needs it to go
        try:
            data = work / "data"
            data.mkdir(parents=True)
            progress = _Progress(source.description, total, len(listing.files))
            for f in listing.files:
                self._fetch_file(source, f, join_inside(data, f.relpath), progress)
            progress.done()
            meta = {
                "key": key,
                "size": total,
                "single": listing.single,
                "files": [{"relpath": f.relpath, "size": f.size} for f in listing.files],
                "created": time.time(),
            }
            (work / "meta.json").write_text(json.dumps(meta))
            with self._global_lock():
                ledger = self._read_ledger()
                if ledger is not None:  # raised first: a crash here leaves it above the truth
                    self._write_ledger(ledger + total)
                os.rename(work, self._entry_dir(digest))  # the atomic publish
                _unlink(self._tmp / f"{token}.lock")
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(rfd, fcntl.LOCK_UN)
            os.close(rfd)
            if work.exists() or (self._tmp / f"{token}.lock").exists():
                with self._global_lock():
                    shutil.rmtree(work, ignore_errors=True)
                    _unlink(self._tmp / f"{token}.lock")

    def _fetch_file(self, source: Source, f: RemoteFile, dest: Path, progress: _Progress) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5(usedforsecurity=False)
        written = 0
        with open(dest, "wb") as out:

            def sink(chunk: bytes) -> None:
                nonlocal written
                written += len(chunk)
                if written > f.size:
                    raise ModelLoadFailed(
                        f"{source.description}: {f.relpath} is larger than the {f.size} bytes listed"
                    )
                out.write(chunk)
                md5.update(chunk)
                progress.add(len(chunk))

            expected_md5 = source.download(f, sink)
            out.flush()
            os.fsync(out.fileno())
        if written != f.size:
            raise ModelLoadFailed(
                f"{source.description}: {f.relpath} downloaded {written} bytes, expected {f.size}"
            )
        if expected_md5 is not None and md5.hexdigest() != expected_md5.lower():
            raise ModelLoadFailed(
                f"{source.description}: {f.relpath} failed its MD5 check "
                f"(got {md5.hexdigest()}, expected {expected_md5})"
            )

    def _make_room(self, needed: int, what: str) -> None:
        """Evict least recently used entries not in use until `needed` bytes fit (global lock held).

        The ledger answers "does it fit" without reading every entry's metadata (a scan per
        download cost ~90 ms with a few hundred entries, e.g. reload snapshots): it is raised
        before an entry is published and rewritten from a scan after evictions, so it is never
        below the true total, and the budget still holds. Only when it says "no room" (or is
        missing) do we scan, which also corrects it.
        """
        reserved = self._live_reservations()
        ledger = self._read_ledger()
        if ledger is not None and ledger + reserved + needed <= self.capacity:
            return
        entries = self._scan()
        used = sum(int(m.get("size", 0)) for _, m, _ in entries)
        excess = used + reserved + needed - self.capacity
        if excess <= 0:
            self._write_ledger(used)
            return
        for digest, meta, _ in sorted(entries, key=lambda e: e[2]):
            if excess <= 0:
                break
            if self._try_evict(digest):
                size = int(meta.get("size", 0))
                excess -= size
                used -= size
                log.info("disk cache: evicted %s (%d bytes)", meta.get("key", digest), size)
        self._write_ledger(used)
        if excess > 0:
            raise ModelLoadFailed(
                f"disk cache {self.root} is full: {what} needs {needed} bytes; the budget is "
                f"{self.capacity} bytes (MESH_DISK_CACHE_BYTES), {used} bytes are held by "
                f"entries in use and {reserved} by downloads in progress"
            )

    def _try_evict(self, digest: str) -> bool:
        fd = os.open(self._locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return False  # in use (or being downloaded): never evicted
                raise
            entry = self._entry_dir(digest)
            if not entry.is_dir():
                return False
            trash = self._tmp / f"trash-{digest}-{uuid.uuid4().hex[:8]}"
            os.rename(entry, trash)  # readers see the entry complete or absent, never half-deleted
            shutil.rmtree(trash, ignore_errors=True)
            return True
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _in_use(self, digest: str) -> bool:
        fd = os.open(self._locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def _read_ledger(self) -> int | None:
        try:
            return int((self.root / "ledger").read_text())
        except (OSError, ValueError):
            return None  # missing or damaged: the next _make_room scans and writes it

    def _write_ledger(self, used: int) -> None:
        tmp = self.root / f"ledger.{os.getpid()}.tmp"
        tmp.write_text(str(max(0, used)))
        os.replace(tmp, self.root / "ledger")

    def _scan(self) -> list[tuple[str, dict, float]]:
        out = []
        for entry in self._entries.iterdir():
            try:
                meta = json.loads((entry / "meta.json").read_text())
                mtime = entry.stat().st_mtime
            except (OSError, ValueError):
                continue  # vanished under us (evicted by another process)
            out.append((entry.name, meta, mtime))
        return out

    def _live_reservations(self) -> int:
        """Bytes reserved by downloads in progress; cleans up after processes that died (lock held)."""
        reserved = 0
        held: set[str] = set()
        for lock in self._tmp.glob("*.lock"):
            token = lock.name[: -len(".lock")]
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    held.add(token)
                    try:
                        reserved += int(json.loads(os.pread(fd, 4096, 0) or b"{}").get("size", 0))
                    except ValueError:
                        pass
                    continue
                # nobody holds it: its downloader died; drop the reservation and its files
                shutil.rmtree(self._tmp / token, ignore_errors=True)
                _unlink(lock)
            finally:
                os.close(fd)
        for leftover in self._tmp.iterdir():
            if leftover.is_dir() and leftover.name not in held:
                shutil.rmtree(leftover, ignore_errors=True)
        return reserved

    @contextlib.contextmanager
    def _global_lock(self) -> Iterator[None]:
        fd = os.open(self.root / "cache.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class _Progress:
    """Download progress in the logs: start, every PROGRESS_EVERY_S, and the end with the rate."""

    def __init__(self, what: str, total: int, nfiles: int) -> None:
        self.what, self.total = what, total
        self.done_bytes = 0
        self.started = self.last = time.monotonic()
        log.info("downloading %s: %d file(s), %s", what, nfiles, _mib(total))

    def add(self, n: int) -> None:
        self.done_bytes += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            pct = 100.0 * self.done_bytes / self.total if self.total else 100.0
            log.info(
                "downloading %s: %s of %s (%.0f%%)",
                self.what, _mib(self.done_bytes), _mib(self.total), pct,
            )  # fmt: skip

    def done(self) -> None:
        elapsed = max(1e-6, time.monotonic() - self.started)
        log.info(
            "downloaded %s: %s in %.2fs (%s/s)",
            self.what, _mib(self.done_bytes), elapsed, _mib(int(self.done_bytes / elapsed)),
        )  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n} bytes"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
