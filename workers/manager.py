"""The model manager: a cache of loaded models bounded by bytes, single-flight loads, safe eviction.

Which model leaves a full cache is the retention policy's call (workers/retention.py: decayed
request count then last use by default, or plain LRU).

Loads and unloads run on the manager's own threads; the consumer thread only submits work
here and returns, so message intake never stalls behind a model load.

Eviction order (DESIGN §4), so no request is lost or failed because its model left:
1. stop accepting and stop consuming the model's queue,
2. requeue its buffered requests (another copy, or this model's next load, answers them),
3. wait for the batch that is running to finish,
4. unload, then update Redis.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachetools import Cache

from mesh.config import effective_config, record_manifest
from mesh.errors import MeshError, ModelLoadFailed, ModelNotFound
from mesh.models import CopyState, LoadedModel, ModelRecord
from mesh.storage import acquire_model, release_model

from .batcher import BatchPolicy
from .retention import FRESH_S, Candidate, UsageMeter, first_victim
from .runtimes import get_runtime
from .runtimes.base import Loaded
from .snapshots import Snapshots

if TYPE_CHECKING:
    from .worker import MeshWorker

log = logging.getLogger("mesh.worker.manager")


@dataclass
class Entry:
    model_id: str
    record: ModelRecord
    policy: BatchPolicy
    state: str = "LOADING"  # LOADING | LOADED | EVICTING
    loaded: Loaded | None = None
    size_bytes: int = 0
    loaded_at: float = 0.0
    last_used: float = field(default_factory=time.time)
    inflight: int = 0
    reserved: int = 0  # bytes promised to this load until it is installed
    touched: int = 0  # order of last use (a sequence number: no two uses tie)
    served: bool = False  # answered a batch since its load (retention.FRESH_S)


class _ModelCache(Cache):
    """cachetools' cache bounded by bytes, whose victim the retention policy names. An entry
    it pops is only marked for retirement here (the manager lock is held); the manager retires
    it after releasing the lock."""

    def __init__(self, capacity: int, victim: Callable[[], str | None], on_evict: Callable[[Entry], None]) -> None:
        super().__init__(maxsize=capacity, getsizeof=lambda e: max(1, e.size_bytes))
        self._victim = victim
        self._on_evict = on_evict

    def popitem(self):  # called by cachetools if an insert overflows (the manager evicts first)
        key = self._victim()
        if key is None:
            raise KeyError("the cache is empty")
        entry = self.pop(key)
        self._on_evict(entry)
        return key, entry


class ModelManager:
    def __init__(self, host: MeshWorker) -> None:
        self.host = host
        s = host.settings
        self.capacity = s.worker_capacity_bytes
        self.load_timeout_s = s.load_timeout_s
        self.evict_grace_s = 1.0
        self._lock = threading.RLock()  # guards _entries, _cache, _usage, _victims, _reserved
        self._inflight = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._victims: list[Entry] = []
        self.eviction_policy = s.eviction_policy
        self._usage = UsageMeter(s.eviction_decay_s)
        self._uses = itertools.count(1)
        self._cache = _ModelCache(self.capacity, self._first_victim, self._victims.append)
        self.snapshots = Snapshots(s)
        self._snapshot_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-snapshot")
        self._reserved = 0  # bytes promised to loads in progress
        self._pool = ThreadPoolExecutor(
            max_workers=s.loading_concurrency, thread_name_prefix="mesh-loader"
        )
        self._closing = False

    # ------------------------------------------------------------ commands (any thread)
    def request_load(self, model_id: str) -> None:
        """Single-flight: a load already running or done for this model is not repeated."""
        with self._lock:
            if self._closing:
                return
            entry = self._entries.get(model_id)
            if entry is not None:
                if entry.state == "LOADED":
                    # a duplicate command (e.g. a retried claim): re-assert the copy record
                    self._pool.submit(self._reassert, model_id)
                return
            self._entries[model_id] = Entry(model_id, None, BatchPolicy(1, 0.0))  # type: ignore[arg-type]
        self._pool.submit(self._load, model_id)

    def request_unload(self, model_id: str, fail_with: MeshError | None = None) -> None:
        with self._lock:
            if self._closing:
                return
        self._pool.submit(self._unload, model_id, fail_with)

    # ------------------------------------------------------------ inference thread
    def acquire(self, model_id: str, requests: int = 1) -> Entry | None:
        """Pin a model for one batch of `requests`; None if it is not (or no longer) served here.

        A model being evicted may still answer what it had buffered (the grace period):
        that is what guarantees progress when models take turns in a full cache.
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.loaded is None or entry.state == "LOADING":
                return None
            with self._inflight:
                entry.inflight += 1
            entry.last_used = time.time()
            entry.touched = next(self._uses)
            entry.served = True
            self._usage.record(model_id, requests, time.monotonic())
            return entry

    def release(self, entry: Entry) -> None:
        with self._inflight:
            entry.inflight -= 1
            self._inflight.notify_all()

    # ------------------------------------------------------------ reporting
    def snapshot(self) -> tuple[list[LoadedModel], list[str], int]:
        """(loaded models, models loading, used bytes) for the heartbeat."""
        buffered = self.host.batcher.buffered()
        with self._lock:
            loaded = [
                LoadedModel(
                    model_id=e.model_id,
                    size_bytes=e.size_bytes,
                    last_used=e.last_used,
                    loaded_at=e.loaded_at,
                    inflight=e.inflight,
                    buffered=buffered.get(e.model_id, 0),
                )
                for e in self._entries.values()
                if e.state == "LOADED"
            ]
            loading = [m for m, e in self._entries.items() if e.state == "LOADING"]
            return loaded, loading, self._cache.currsize + self._reserved

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return [m for m, e in self._entries.items() if e.state == "LOADED"]

    def loaded_records(self) -> dict[str, ModelRecord]:
        """model id -> the record each loaded model was loaded from."""
        with self._lock:
            return {m: e.record for m, e in self._entries.items() if e.state == "LOADED"}

    # ------------------------------------------------------------ loader threads
    def _load(self, model_id: str) -> None:
        store, name = self.host.store, self.host.name
        started = time.monotonic()
        try:
            # the record, and our copy marked LOADING, in one round trip: loads run one after
            # another, so every round trip here delays the next cold request too
            record = store.begin_load(model_id, name)
            if record is None:
                raise ModelNotFound(f"model {model_id!r} is not registered")
            cfg = effective_config(
                model_id, record.info, self.host.settings, manifest=record_manifest(record)
            )
            policy = BatchPolicy(
                cfg.value("max_batch_size"),
                cfg.value("max_batch_delay_ms") / 1000.0,
                tuple(cfg.value("preferred_batch_sizes") or ()),
            )
            predicted = record.size_bytes or record.info.size_bytes or 0
            waiting = self.host.batcher.buffered()
            with self._lock:
                entry = self._entries[model_id]
                entry.record, entry.policy = record, policy
                self._evict_until_fits(predicted, waiting)
                self._reserve(entry, predicted)
            # The victims retire (stop intake, finish or requeue their buffered requests, wait
            # for a running batch, unload) while the runtime loads this model, not before it:
            # in sequence a cold request waited for both (multimodel bench: a load took 88 ms
            # inside the worker against 35 ms in a plain Celery task). Memory may exceed the
            # capacity by the victims' size for that overlap.
            retiring = threading.Thread(target=self._retire_victims, name=f"mesh-retire-for-{model_id}",
                                        daemon=True)  # fmt: skip
            retiring.start()
            try:
                loaded, path, restored = self._load_with_timeout(record)
            finally:
                retiring.join()
            self._install(entry, loaded)
        except ModelNotFound as exc:
            log.info("not loading %s: %s", model_id, exc)
            self._forget(model_id)
            store.remove_copy(model_id, name)
            store.release_claim(model_id, name)
            return
        except Exception as exc:  # any load failure becomes a failure record, never a crash
            message = str(exc) if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "loading %s failed after %.2fs: %s", model_id, time.monotonic() - started, message
            )
            self._forget(model_id)
            self.host.metrics.loads.labels(model_id, "failed").inc()
            self.host.on_load_failed(model_id, message)
            return
        elapsed = time.monotonic() - started
        mx = self.host.metrics
        mx.loads.labels(model_id, "success").inc()
        mx.load_seconds.labels(model_id).observe(elapsed)
        mx.cache.labels("miss").inc()
        log.info("loaded %s (%d bytes) in %.3fs%s", model_id, entry.size_bytes, elapsed,
                 " from its snapshot" if restored else "")  # fmt: skip
        if restored:
            mx.restores.labels(model_id).inc()
        elif entry.state == "LOADED" and self.snapshots.offered(loaded.runtime):
            # on its own thread: the next load (and its cold requests) does not wait for it
            self._snapshot_pool.submit(self.snapshots.save, loaded.runtime, record.info, path, loaded.model)

    def _reserve(self, entry: Entry, nbytes: int) -> None:
        self._reserved += nbytes - entry.reserved
        entry.reserved = nbytes

    def _forget(self, model_id: str) -> None:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None and entry.state == "LOADING":
                del self._entries[model_id]
                self._reserve(entry, 0)
        release_model(model_id)  # a failed load's files may leave the disk cache

    def _load_with_timeout(self, record: ModelRecord) -> tuple[Loaded, Path, bool]:
        """Run the runtime's load on a throwaway thread so a hung load cannot hang the worker.
        Returns (loaded, the model's local path, whether it came from its reload snapshot)."""
        result: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()

        def run() -> None:
            try:
                runtime = get_runtime(record.info.runtime)
                # the files stay pinned in the disk cache until the model is unloaded
                path = acquire_model(record.model_id, record.info, self.host.settings)
                result["path"] = path
                result["loaded"] = self.snapshots.restore(runtime, record.info, path, record.size_bytes)
                result["restored"] = result["loaded"] is not None
                if not result["restored"]:
                    # a reload reuses the size measured at the first load (models are immutable)
                    result["loaded"] = runtime.load(path, record.info, known_size=record.size_bytes)
            except BaseException as exc:  # handed to the loader thread below
                result["error"] = exc
            finally:
                done.set()
                if abandoned.is_set() and "loaded" in result:
                    result["loaded"].runtime.unload(result["loaded"].model)
                if abandoned.is_set():
                    release_model(record.model_id)

        threading.Thread(target=run, name=f"mesh-load-{record.model_id}", daemon=True).start()
        if not done.wait(self.load_timeout_s):
            abandoned.set()
            raise ModelLoadFailed(
                f"loading {record.model_id!r} timed out after {self.load_timeout_s:g}s"
            )
        if "error" in result:
            raise result["error"]
        return result["loaded"], result["path"], result["restored"]

    def _install(self, entry: Entry, loaded: Loaded) -> None:
        model_id = entry.model_id
        size = max(1, int(loaded.size_bytes))
        if size > self.capacity:
            loaded.runtime.unload(loaded.model)
            raise ModelLoadFailed(
                f"model {model_id!r} needs {size} bytes, more than this worker's capacity "
                f"of {self.capacity} bytes (MESH_WORKER_CAPACITY_BYTES)"
            )
        waiting = self.host.batcher.buffered()
        with self._lock:
            self._reserve(entry, 0)
            entry.loaded, entry.size_bytes = loaded, size
            entry.loaded_at = entry.last_used = time.time()
            entry.touched = next(self._uses)
            self._evict_until_fits(size, waiting)
            self._cache[model_id] = entry
            entry.state = "LOADED"
        self._retire_victims()
        self.host.batcher.open(model_id, entry.policy)
        # placement reads the measured size: known by the time anyone sees the copy LOADED
        # (a reload measured nothing new: its record already holds it)
        if entry.record.size_bytes != size:
            self.host.store.set_size(model_id, size)
        # Consume the model's queue, and mark the copy LOADED in the same round trip that
        # rings our command queue's bell, so an idle consumer's wait returns and takes the
        # queue now (the consumer thread adds it on its next turn, queued before the ring).
        self.host.consume(model_id, wake=False)
        if not self.host.store.mark_copy(model_id, self.host.name, CopyState.LOADED,
                                         ring=self.host.keys.worker_queue(self.host.name)):  # fmt: skip
            # unregistered while we were loading: undo, and fail anything that queued meanwhile
            self._unload(model_id, ModelNotFound(f"model {model_id!r} was unregistered"))
            return
        self.host.update_prefetch()
        self.host.on_copy_loaded(model_id)

    def _reassert(self, model_id: str) -> None:
        self.host.store.mark_copy(model_id, self.host.name, CopyState.LOADED)

    def _first_victim(self, waiting: Mapping[str, int] | None = None) -> str | None:
        """The loaded model the retention policy gives up first (lock held). `waiting`: the
        requests buffered per model (read before the lock: the batcher has its own)."""
        now, wall = time.monotonic(), time.time()
        waiting = waiting or {}
        return first_victim(
            (
                Candidate(
                    m,
                    self._usage.score(m, now) + waiting.get(m, 0) + e.inflight,
                    e.touched,
                    fresh=not e.served and wall - e.loaded_at < FRESH_S,
                )
                for m, e in self._cache.items()
            ),
            self.eviction_policy,
        )

    def _evict_until_fits(self, needed: int, waiting: Mapping[str, int] | None = None) -> None:
        """Evict the policy's victims until `needed` more bytes fit (lock held)."""
        while self._cache and self._cache.currsize + self._reserved + needed > self.capacity:
            victim = self._cache.pop(self._first_victim(waiting))
            self._victims.append(victim)
            victim.state = "EVICTING"
            log.info("evicting %s (%d bytes) to make room", victim.model_id, victim.size_bytes)

    def _retire_victims(self) -> None:
        with self._lock:
            victims, self._victims[:] = list(self._victims), []
        for victim in victims:
            self._retire(victim, fail_with=None)

    def _unload(self, model_id: str, fail_with: MeshError | None) -> None:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.state == "LOADING":
                # nothing here (or a load that will find the record gone and undo itself)
                if fail_with is not None:
                    self.host.fail_model(model_id, fail_with)
                return
            if entry.state == "EVICTING":
                return
            del self._cache[model_id]
            entry.state = "EVICTING"
            if fail_with is not None:  # unregistered: a model registered again starts afresh
                self._usage.forget(model_id)
        self._retire(entry, fail_with)

    def _retire(self, entry: Entry, fail_with: MeshError | None) -> None:
        """Stop intake, let buffered requests finish (bounded), requeue the rest, unload."""
        model_id = entry.model_id
        if fail_with is not None:
            self.host.fail_model(model_id, fail_with)
        else:
            self.host.stop_consuming(model_id)
            self.host.batcher.seal(model_id)
            self.host.batcher.wait_empty(model_id, self.evict_grace_s)
            self.host.requeue(self.host.batcher.close(model_id), wait_s=5.0)
        with self._inflight:
            while entry.inflight:
                self._inflight.wait(1.0)
        with self._lock:
            if self._entries.get(model_id) is entry:
                del self._entries[model_id]
        if entry.loaded is not None:
            try:
                entry.loaded.runtime.unload(entry.loaded.model)
            except Exception:
                log.exception("runtime unload of %s raised; dropping it anyway", model_id)
        entry.loaded = None
        self.host.metrics.unloads.labels(model_id, "unregistered" if fail_with is not None else "evicted").inc()
        release_model(model_id)  # its files may now leave the disk cache (LRU)
        self.host.store.remove_copy(model_id, self.host.name)
        self.host.update_prefetch()
        self.host.after_unload(model_id, unregistered=fail_with is not None)

    def shutdown(self) -> None:
        with self._lock:
            self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._snapshot_pool.shutdown(wait=False, cancel_futures=True)
