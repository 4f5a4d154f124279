"""Fast reloads: a worker's snapshot of a loaded model, kept in the host's disk cache.

A multi-model worker loads the same models again and again as they take turns in its memory,
so what a reload costs matters as much as how often it happens. Some runtimes' loads are slow
Python work that a snapshot avoids: joblib unpickles sklearn models with the pure-Python pickle
implementation, while the C unpickler reads the same model, pickled by the worker after its
first load, 5-7x faster. A runtime offers snapshots through `Runtime.snapshot` / `restore`
(workers/runtimes/base.py); this module decides when to write and read them.

- Written once, after a model's first load from its files (off the request's path: its copy is
  already serving), into the disk cache (mesh/storage/diskcache.py: LRU by bytes under
  MESH_DISK_CACHE_BYTES, shared by the host's workers, atomic, single flight).
- Read on a reload, when the record knows the model's size. The key names the runtime, its
  library versions (`snapshot_tag`), the model's location and the size and modification time
  of its files: a changed file or an upgraded library never reads an old snapshot.
- Any failure (no room, a damaged or unreadable snapshot) only means the model loads from its
  files as usual; it is logged, never fatal. MESH_RELOAD_SNAPSHOTS=false turns this off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.models import ModelInfo
from mesh.settings import MeshSettings
from mesh.storage.diskcache import DiskCache, Listing, RemoteFile
from mesh.storage.sources import get_storage

from .runtimes.base import Loaded, Runtime

log = logging.getLogger("mesh.worker.snapshots")

SNAPSHOT_FILE = "snapshot.pkl"


def files_fingerprint(path: Path) -> str:
    """Size and modification time of the model's files (one file, or a directory's files)."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    parts = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            st = full.stat()
            parts.append(f"{full.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def snapshot_key(runtime: Runtime, info: ModelInfo, path: Path) -> str:
    return "\n".join(("snapshot", runtime.name, runtime.snapshot_tag(), info.uri, info.storage_key or "",
                      files_fingerprint(path)))  # fmt: skip


class _Blob:
    """A disk cache source whose one file is bytes in memory (the cache's Source protocol)."""

    def __init__(self, data: bytes, description: str) -> None:
        self.data = data
        self.description = description

    def listing(self) -> Listing:
        return Listing(files=(RemoteFile(relpath=SNAPSHOT_FILE, size=len(self.data)),), single=True)

    def download(self, file: RemoteFile, sink: Callable[[bytes], None]) -> str | None:
        sink(self.data)
        return None


class Snapshots:
    def __init__(self, settings: MeshSettings) -> None:
        self.enabled = settings.reload_snapshots
        self.settings = settings
        self._cache: DiskCache | None = None

    @property
    def cache(self) -> DiskCache:
        if self._cache is None:
            self._cache = get_storage(self.settings).cache
        return self._cache

    def offered(self, runtime: Runtime) -> bool:
        return self.enabled and type(runtime).snapshot is not Runtime.snapshot

    def read(self, runtime: Runtime, info: ModelInfo, path: Path, known_size: int | None) -> bytes | None:
        """The model's snapshot as bytes, or None (no snapshot, or it could not be read).

        Read ahead of the load (the model manager's fetch stage): the file operations happen
        while the previous load runs, and the load itself only unpickles."""
        if not known_size or not self.offered(runtime):
            return None
        try:
            lease = self.cache.lookup(snapshot_key(runtime, info, path))
        except Exception as exc:
            log.warning("could not look up the snapshot of %s: %s", info.uri, exc)
            return None
        if lease is None:
            return None
        try:
            return lease.path.read_bytes()
        except OSError as exc:
            log.warning("could not read the snapshot of %s: %s", info.uri, exc)
            return None
        finally:
            lease.release()

    def restore_bytes(self, runtime: Runtime, info: ModelInfo, data: bytes, known_size: int) -> Loaded | None:
        """The model from snapshot bytes `read` returned, or None when they cannot be restored
        (damaged, or written by something else: the caller loads the files instead)."""
        try:
            return runtime.restore(data, info, known_size)
        except Exception as exc:
            log.warning("could not restore %s from its snapshot (%s: %s); loading its files",
                        info.uri, type(exc).__name__, exc)  # fmt: skip
            return None

    def restore(self, runtime: Runtime, info: ModelInfo, path: Path, known_size: int | None) -> Loaded | None:
        """`read` then `restore_bytes`: the model from its snapshot, or None."""
        data = self.read(runtime, info, path, known_size)
        return None if data is None else self.restore_bytes(runtime, info, data, known_size)

    def save(self, runtime: Runtime, info: ModelInfo, path: Path, model: Any) -> bool:
        """Write the snapshot of a model just loaded from its files; False if none was written."""
        if not self.offered(runtime):
            return False
        try:
            data = runtime.snapshot(model)
            if data is None:
                return False
            self.cache.acquire(snapshot_key(runtime, info, path), _Blob(data, f"snapshot of {info.uri}")).release()
            return True
        except Exception as exc:  # no room, disk full...: reloads read the files as before
            log.warning("could not write the snapshot of %s: %s", info.uri, exc)
            return False
