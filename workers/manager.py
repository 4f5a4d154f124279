"""The model manager: a cache of loaded models bounded by bytes, single-flight loads, safe eviction.

Which model leaves a full cache is the retention policy's call (workers/retention.py: decayed
request count then last use by default, or plain LRU).

Loads and unloads run on the manager's own threads; the consumer thread only submits work
here and returns, so message intake never stalls behind a model load.

A load goes through the worker's line in two stages (`_Job`):
- fetch (MESH_LOAD_PREFETCH threads, up to that many loads ahead): the registry record, the
  model's files (downloaded into the disk cache if remote) and its reload snapshot's bytes.
  I/O only: nothing is evicted and no memory is promised yet.
- load (MESH_LOADING_CONCURRENCY at a time, on the fetch thread when a slot is free, else on a
  loader thread): make room, build the model (from the snapshot's bytes, else the runtime's
  load), install it, mark the copy LOADED.
A model this process loaded before has its queue consumed from the moment its reload is asked
for: its requests wait here, held by the batcher, and are batched as soon as it is installed.
Every blocking call gives up the interpreter lock, and with the intake and inference threads
busy, taking it back costs up to the switch interval (5 ms): a reload that needs 3 ms of CPU
took ~22 ms in a busy worker, most of it in the ~25 round trips and file operations around
the unpickling (multimodel bench). The fetch stage does those while the previous load runs.

Capacity is enforced here, not by cachetools (its cache only keeps the byte count): before a
load the manager evicts the policy's victims until the model fits. One exception: copies the
policy would give up first that are still fresh (loaded, nothing answered yet) are held above
capacity instead, by at most MESH_FRESH_OVERCOMMIT_FRACTION of it, and evicted once they have
answered (`trim`; workers/retention.py says why).

Eviction order (docs/architecture.md, "The worker"), so no request is lost or failed because its model left:
1. stop accepting and stop consuming the model's queue,
2. requeue its buffered requests (another copy, or this model's next load, answers them),
3. wait for the batch that is running to finish,
4. unload, then update Redis.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachetools import Cache, LRUCache

from mesh.errors import MeshError, ModelLoadFailed, ModelNotFound
from mesh.models import CopyState, LoadedModel, ModelRecord
from mesh.policy.labels import matches
from mesh.policy.precedence import effective_config, record_manifest, required_labels
from mesh.protocol.labels import format_labels
from mesh.storage.sources import acquire_model, release_model

from .batcher import BatchPolicy
from .retention import FRESH_S, HISTORY_MODELS, Candidate, UsageMeter, make_room
from .runtimes import get_runtime
from .runtimes.base import Loaded, model_signature
from .runtimes.python import allowed_modules, check_python_class
from .snapshots import Snapshots
from .threadnames import name_os_thread

if TYPE_CHECKING:
    from mesh.settings import MeshSettings
    from mesh.store.state import StateStore

    from .batcher import Batcher
    from .collector import Collector
    from .metrics import WorkerMetrics
    from .ports import ConsumerPort, CopyEvents

log = logging.getLogger("mesh.worker.manager")


class _NotInPool(Exception):
    """The model's required labels are not all this worker's (mesh/policy/labels.py)."""


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
    trim_after: bool = False  # held above capacity for: trim when its first batch is done


@dataclass
class _Job:
    """One load on its way through the line: fetched, then loaded."""

    model_id: str
    requested: float  # time.monotonic() when the load was asked for
    early: bool = False  # its model's requests are taken in (held) while it loads
    record: ModelRecord | None = None
    path: Path | None = None
    snapshot: bytes | None = None  # the reload snapshot's bytes, when there is one
    fetch_s: float = 0.0  # time spent fetching (part of the load's own time)


# Victim retirements still running when the next load starts making room: beyond this the load
# waits, so memory above capacity stays bounded by a few loads' victims (plus the fresh copies
# retention.make_room holds, MESH_FRESH_OVERCOMMIT_FRACTION).
RETIRE_BACKLOG = 2


class ModelManager:
    def __init__(
        self,
        settings: MeshSettings,
        name: str,
        store: StateStore,
        batcher: Batcher,
        metrics: WorkerMetrics,
        consumer: ConsumerPort,
        events: CopyEvents,
        collector: Collector | None = None,
    ) -> None:
        self.settings = settings
        self.name = name  # this worker's node name (its copies' owner in Redis)
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.consumer = consumer
        self.events = events
        self.collector = collector  # told of every model dropped (workers/collector.py)
        s = settings
        self.capacity = s.worker_capacity_bytes
        self.load_timeout_s = s.load_timeout_s
        self.labels = s.labels  # MESH_WORKER_LABELS: a model requiring others is refused
        self._python_modules = allowed_modules(s.python_modules)
        self.evict_grace_s = 1.0
        # the batch policy of a model whose record is not read yet (its buffer, held, only
        # counts towards the prefetch budget until then)
        self._provisional = BatchPolicy(s.max_batch_size, s.max_batch_delay_ms / 1000.0,
                                        predict_timeout_s=s.predict_timeout_s)
        # model id -> the info of a load of it that succeeded in this process (`request_load`)
        self._proven: LRUCache = LRUCache(maxsize=HISTORY_MODELS)
        # (model id, registration) whose signature this process recorded (`_record_signature`)
        self._signed: LRUCache = LRUCache(maxsize=HISTORY_MODELS)
        self._lock = threading.RLock()  # guards _entries, _cache, _usage, _victims, _reserved
        self._inflight = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._victims: list[Entry] = []
        self.eviction_policy = s.eviction_policy
        self.overcommit = int(s.worker_capacity_bytes * s.fresh_overcommit_fraction)
        self._usage = UsageMeter(s.eviction_decay_s)
        self._uses = itertools.count(1)
        # unbounded for cachetools: the manager evicts (retention.make_room)
        self._cache: Cache = Cache(maxsize=math.inf, getsizeof=lambda e: max(1, e.size_bytes))
        self._over = False  # above capacity, holding fresh copies, until `trim`
        self.snapshots = Snapshots(s)
        self._snapshot_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mesh-snapshot", initializer=name_os_thread
        )
        self._reserved = 0  # bytes promised to loads in progress
        self._pool = ThreadPoolExecutor(
            max_workers=s.loading_concurrency, thread_name_prefix="mesh-loader", initializer=name_os_thread
        )
        self.prefetch = s.load_prefetch
        self._fetchers = (
            ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="mesh-fetch", initializer=name_os_thread)
            if self.prefetch else None
        )  # fmt: skip
        # jobs between the start of their fetch and the end of their load: bounds the snapshots
        # held in memory ahead of their load
        self._ahead = threading.Semaphore(self.prefetch + s.loading_concurrency)
        # loads running (MESH_LOADING_CONCURRENCY), on a loader thread or on the fetch thread
        # that fetched them (`_queue_load`)
        self._load_slots = threading.BoundedSemaphore(s.loading_concurrency)
        # kept threads for guarded calls (`_with_timeout`), one per call that can run at once
        guards = self.prefetch + s.loading_concurrency
        self._guards = ThreadPoolExecutor(
            max_workers=guards, thread_name_prefix="mesh-guard", initializer=name_os_thread
        )
        self._guards_idle = threading.Semaphore(guards)
        self._retirer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-retire", initializer=name_os_thread)
        self._retiring: deque[Future] = deque()
        self._retiring_lock = threading.Lock()
        self._closing = False
        # models asked for while their copy here was leaving: loaded again once it has left
        self._load_after_retire: set[str] = set()

    # ------------------------------------------------------------ commands (any thread)
    def request_load(self, model_id: str) -> None:
        """Single-flight: a load already running or done for this model is not repeated.

        But a copy on its way out (EVICTING), or one of an earlier registration of the id (the
        model was unregistered and registered again, and this load is for the new one), is no
        load done: the model is loaded again once that copy has left (`_retire`). Before, the
        load was dropped, its claim stayed, and the new model stayed LOADING for good."""
        with self._lock:
            if self._closing:
                return
            entry = self._entries.get(model_id)
            if entry is not None and entry.state == "EVICTING":
                self._load_after_retire.add(model_id)
                return
            loaded_record = entry.record if entry is not None and entry.state == "LOADED" else None
        if loaded_record is not None:
            if not self._registered_again(model_id, loaded_record):
                # a duplicate command (e.g. a retried claim): re-assert the copy record
                self._pool.submit(self._reassert, model_id)
                return
            log.info("%s was registered again since this copy loaded: replacing the copy", model_id)
            with self._lock:
                self._load_after_retire.add(model_id)
            self.request_unload(model_id)
            return
        with self._lock:
            if self._closing:
                return
            entry = self._entries.get(model_id)
            if entry is not None:
                if entry.state == "EVICTING":
                    self._load_after_retire.add(model_id)
                return
            self._entries[model_id] = Entry(model_id, None, BatchPolicy(1, 0.0))  # type: ignore[arg-type]
            early = model_id in self._proven
        if early:
            # A reload: take the model's requests in from now on, held until it is installed
            # (the fetch stage's round trip rings our queue, so an idle consumer's wait takes
            # the queue in). Consuming only once the copy was LOADED put a mark, a wake-up and
            # a pop between the load and its first request: 3-5 ms of a cold request, 13-22 ms
            # at p90, on a busy worker (closedloop zipf). Only for a model this process loaded
            # before: requests taken in by a worker that dies are back only after the
            # visibility timeout, and a first load is when a model may take its worker down.
            self.batcher.hold(model_id, self._provisional)
            self.consumer.consume(model_id, wake=False)
        job = _Job(model_id, time.monotonic(), early=early)
        if self._fetchers is not None:
            self._fetchers.submit(self._fetch_then, job, self._queue_load)
        else:
            self._pool.submit(self._fetch_then, job, self._load)

    def _registered_again(self, model_id: str, record: ModelRecord) -> bool:
        try:
            current = self.store.get_record(model_id)
        except Exception:  # noqa: BLE001 - unknown: keep the copy, as before this check
            log.warning("could not read the record of %s; keeping its copy", model_id, exc_info=True)
            return False
        return current is not None and current.created_at != record.created_at

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
            if not entry.served and self._over:
                entry.trim_after = True
            entry.served = True
            self._usage.record(model_id, requests, time.monotonic())
            return entry

    def release(self, entry: Entry) -> None:
        with self._inflight:
            entry.inflight -= 1
            self._inflight.notify_all()
        if entry.trim_after:
            entry.trim_after = False
            try:
                self.trim()
            except Exception:  # the batch is answered; the heartbeat trims again
                log.exception("trimming back to capacity failed")

    def trim(self) -> None:
        """Back to capacity, as far as no fresh copy still needs the room: after a copy's first
        batch, and from the heartbeat (for a copy nobody asks for, which stops being fresh
        after FRESH_S). Any thread."""
        if not self._over or self._closing:
            return
        if sum(not f.done() for f in self._retiring.copy()) >= RETIRE_BACKLOG:
            # retirements are behind: the held copies stay (within the allowance) until the
            # next first batch or heartbeat, rather than pile up more memory being freed
            return
        waiting = self.batcher.buffered()
        with self._lock:
            self._evict_until_fits(0, waiting)
            victims, self._victims[:] = list(self._victims), []
        if victims:
            # Without _retiring_lock: a loader holds it while it waits for earlier retirements,
            # which may need the inference thread (our caller) to drain their buffers. deque
            # appends (and copies) are atomic; a load that evicts waits for these like any other.
            self._retiring.append(self._retirer.submit(self._retire_all, victims))

    # ------------------------------------------------------------ reporting
    def snapshot(self) -> tuple[list[LoadedModel], list[str], int]:
        """(loaded models, models loading, used bytes) for the heartbeat."""
        buffered = self.batcher.buffered()
        since, now = self.batcher.waiting_since(), time.monotonic()
        with self._lock:
            loaded = [
                LoadedModel(
                    model_id=e.model_id,
                    size_bytes=e.size_bytes,
                    last_used=e.last_used,
                    loaded_at=e.loaded_at,
                    inflight=e.inflight,
                    buffered=buffered.get(e.model_id, 0),
                    oldest_buffered_s=round(now - since[e.model_id], 3) if e.model_id in since else 0.0,
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
    def _fetch_then(self, job: _Job, then: Callable[[_Job], Any]) -> None:
        """Fetch stage, then `then(job)`: queue it for the load stage (on a fetch thread), or
        load it right here (on a loader thread, MESH_LOAD_PREFETCH=0)."""
        self._ahead.acquire()
        if self._fetch(job):
            then(job)
        else:
            self._ahead.release()

    def _queue_load(self, job: _Job) -> None:
        """On a fetch thread: the load stage right here when a load slot is free, else in the
        loader threads' line. Handing every load to a loader thread cost a thread switch, up to
        the interpreter's switch interval in a busy worker, on each cold request's path."""
        if self._load_slots.acquire(blocking=False):
            self._load(job, slot_held=True)
        else:
            self._pool.submit(self._load, job)

    def _fetch(self, job: _Job) -> bool:
        """The record (and our copy marked LOADING), the files and the reload snapshot's bytes.
        False if the load ended here (failed, or the model is not registered)."""
        started = time.monotonic()
        model_id = job.model_id
        try:
            # one round trip, which also rings our queue when the model's is consumed already
            ring = self.store.keys.worker_queue(self.name) if job.early else None
            record = self.store.begin_load(model_id, self.name, ring=ring)
            if record is None:
                raise ModelNotFound(f"model {model_id!r} is not registered")
            required = required_labels(record)
            if not matches(required, self.labels):
                # sent here on an older view (a heartbeat before a restart with other labels,
                # a producer of an older release): refused, before a byte is fetched
                raise _NotInPool(f"it requires {format_labels(required)}; this worker offers "
                                 f"{{{format_labels(self.labels)}}}")  # fmt: skip
            self.metrics.note(model_id)  # registered: its series may exist before a heartbeat sees it
            cfg = effective_config(
                model_id, record.info, self.settings, manifest=record_manifest(record)
            )
            policy = BatchPolicy(
                cfg.value("max_batch_size"),
                cfg.value("max_batch_delay_ms") / 1000.0,
                tuple(cfg.value("preferred_batch_sizes") or ()),
                cfg.value("predict_timeout_s"),
            )
            with self._lock:
                entry = self._entries[model_id]
                entry.record, entry.policy = record, policy
                proven = self._proven.get(model_id)
                other = proven is not None and not proven.same_model(record.info)
                if other:
                    del self._proven[model_id]  # registered again, as another model
            if other:
                self._give_back_held(model_id)  # a first load after all
            elif job.early:
                self.batcher.hold(model_id, policy)  # what it holds is batched by the record's
            job.record = record
            if record.info.runtime == "python":  # before a file is read or a module imported
                check_python_class(record.info.python_class, self._python_modules)
            job.path, job.snapshot = self._with_timeout(record, self.load_timeout_s, self._fetch_files, record)
        except Exception as exc:
            self._failed(job, exc, started)
            return False
        job.fetch_s = time.monotonic() - started
        return True

    def _fetch_files(self, record: ModelRecord) -> tuple[Path, bytes | None]:
        runtime = get_runtime(record.info.runtime)
        # the files stay pinned in the disk cache until the model is unloaded
        path = acquire_model(record.model_id, record.info, self.settings)
        return path, self.snapshots.read(runtime, record.info, path, record.size_bytes)

    def _load(self, job: _Job, slot_held: bool = False) -> None:
        """Load stage: make room, build the model, install it (in a load slot, which the caller
        may hold already), then announce it. The announcement's round trips happen after the
        slot is given back: the next load in the line does not wait for them."""
        model_id, record = job.model_id, job.record
        assert record is not None and job.path is not None
        if not slot_held:
            self._load_slots.acquire()
        in_slot = True
        started = time.monotonic()  # after the wait for the slot: not part of its timeout
        try:
            predicted = record.size_bytes or record.info.size_bytes or 0
            waiting = self.batcher.buffered()
            with self._lock:
                entry = self._entries[model_id]
                self._evict_until_fits(predicted, waiting)
                self._reserve(entry, predicted)
            # The victims retire (stop intake, finish or requeue their buffered requests, wait
            # for a running batch, unload) while the runtime loads this model, not before it:
            # in sequence a cold request waited for both (multimodel bench: a load took 88 ms
            # inside the worker against 35 ms in a plain Celery task). Memory may exceed the
            # capacity by the retiring victims' size meanwhile (RETIRE_BACKLOG loads' worth).
            self._retire_victims_soon()
            loaded, restored = self._build(job, started)
            self._install(entry, loaded)
            if not restored and self.snapshots.offered(loaded.runtime):
                # On its own thread: the next load (and its cold requests) does not wait for it.
                # Before the requests are released: a producer answered at once sends the next
                # one, whose download must not find the snapshot still being written into a
                # tight disk cache (MESH_DISK_CACHE_BYTES counts writes in progress).
                self._snapshot_pool.submit(self.snapshots.save, loaded.runtime, record.info, job.path, loaded.model)
            # the requests held while it loaded are batched now, while the bookkeeping (a wait
            # for earlier retirements, the copy's announcement) goes on
            self.batcher.open(model_id, entry.policy)
            self._retire_victims_soon()
            self._load_slots.release()
            in_slot = False
            self._announce(entry)
        except Exception as exc:
            self._failed(job, exc, started - job.fetch_s)
            return
        finally:
            if in_slot:
                self._load_slots.release()
            self._ahead.release()
        now = time.monotonic()
        own = job.fetch_s + now - started  # the load's own time, without its wait in the line
        mx = self.metrics
        mx.loads.labels(model_id, "success").inc()
        mx.load_seconds.labels(model_id).observe(own)
        mx.load_wait_seconds.observe(max(0.0, now - job.requested - own))
        mx.cache.labels("miss").inc()
        log.info("loaded %s (%d bytes) in %.3fs%s", model_id, entry.size_bytes, own,
                 " from its snapshot" if restored else "")  # fmt: skip
        if restored:
            mx.restores.labels(model_id).inc()

    def _build(self, job: _Job, started: float) -> tuple[Loaded, bool]:
        """(the loaded model, whether it came from its reload snapshot)."""
        record = job.record
        runtime = get_runtime(record.info.runtime)
        if job.snapshot is not None:
            data, job.snapshot = job.snapshot, None
            # bytes in memory, unpickled on this thread: no I/O that could hang, and none of
            # the thread hand-offs a guarded load costs
            loaded = self.snapshots.restore_bytes(runtime, record.info, data, record.size_bytes)
            if loaded is not None:
                return loaded, True
        remaining = self.load_timeout_s - job.fetch_s - (time.monotonic() - started)
        # a reload reuses the size measured at the first load (models are immutable)
        loaded = self._with_timeout(record, remaining, runtime.load, job.path, record.info,
                                    known_size=record.size_bytes)  # fmt: skip
        return loaded, False

    def _failed(self, job: _Job, exc: Exception, started: float) -> None:
        """A load that ended in an error: never a crash, a failure record (or, for a model no
        longer registered, nothing)."""
        model_id, store, name = job.model_id, self.store, self.name
        self._give_back_held(model_id)
        if isinstance(exc, ModelNotFound):
            log.info("not loading %s: %s", model_id, exc)
            self._forget(model_id)
            store.remove_copy(model_id, name)
            store.release_claim(model_id, name)
            return
        if isinstance(exc, _NotInPool):
            log.warning("refused to load %s: %s", model_id, exc)
            self._forget(model_id)
            store.remove_copy(model_id, name)
            store.release_claim(model_id, name)
            self.metrics.note(model_id)
            self.metrics.loads.labels(model_id, "refused").inc()
            self.events.load_refused(model_id, str(exc))
            return
        message = str(exc) if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
        log.warning("loading %s failed after %.2fs: %s", model_id, time.monotonic() - started, message)
        self._forget(model_id)
        self.metrics.note(model_id)  # a registered id (its record was read): its series expire
        self.metrics.loads.labels(model_id, "failed").inc()
        self.events.load_failed(model_id, message)

    def _give_back_held(self, model_id: str) -> None:
        """A load that will not happen here: stop taking its model's requests in, and put the
        ones taken in while it loaded back on their queue, before the failure is handled (a
        retry elsewhere, or the failure drain, answers them there)."""
        held = self.batcher.release_held(model_id)
        if held is None:  # not held any more: already failed, or served
            return
        self.consumer.stop_consuming(model_id)
        self.consumer.requeue(held, wait_s=5.0)

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

    def _with_timeout(self, record: ModelRecord, timeout_s: float, fn: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> Any:  # fmt: skip
        """fn(*args, **kwargs) on another thread, so a hung download or runtime load cannot
        hang the worker: after `timeout_s` the load fails and whatever fn returns later is
        dropped (a model unloaded, the files unpinned).

        On a kept thread when one is idle: starting a thread per call made the caller wait for
        the new thread to be scheduled and take the interpreter lock, two thirds of the fetch
        stage's time in a busy worker (py-spy, closedloop zipf). A thread of its own otherwise
        (the kept ones are busy: hung calls, most likely)."""
        result: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()

        def run() -> None:
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the calling thread below
                result["error"] = exc
            finally:
                done.set()
                if abandoned.is_set():
                    value = result.get("value")
                    if isinstance(value, Loaded):
                        value.runtime.unload(value.model)
                    release_model(record.model_id)

        def kept() -> None:
            try:
                run()
            finally:
                self._guards_idle.release()

        if not self._guards_idle.acquire(blocking=False):
            threading.Thread(target=run, name=f"mesh-load-{record.model_id}", daemon=True).start()
        else:
            try:
                self._guards.submit(kept)
            except RuntimeError:  # shut down
                self._guards_idle.release()
                threading.Thread(target=run, name=f"mesh-load-{record.model_id}", daemon=True).start()
        if not done.wait(max(0.0, timeout_s)):
            abandoned.set()
            raise ModelLoadFailed(
                f"loading {record.model_id!r} timed out after {self.load_timeout_s:g}s"
            )
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _install(self, entry: Entry, loaded: Loaded) -> None:
        model_id = entry.model_id
        size = max(1, int(loaded.size_bytes))
        if size > self.capacity:
            loaded.runtime.unload(loaded.model)
            raise ModelLoadFailed(
                f"model {model_id!r} needs {size} bytes, more than this worker's capacity "
                f"of {self.capacity} bytes (MESH_WORKER_CAPACITY_BYTES)"
            )
        waiting = self.batcher.buffered()
        with self._lock:
            self._reserve(entry, 0)
            entry.loaded, entry.size_bytes = loaded, size
            entry.loaded_at = entry.last_used = time.time()
            entry.touched = next(self._uses)
            self._evict_until_fits(size, waiting)
            self._cache[model_id] = entry
            entry.state = "LOADED"
            self._proven[model_id] = entry.record.info

    def _announce(self, entry: Entry) -> None:
        """An installed copy in Redis: its measured size, LOADED, our queue's ring."""
        model_id, size = entry.model_id, entry.size_bytes
        # placement reads the measured size: known by the time anyone sees the copy LOADED
        # (a reload measured nothing new: its record already holds it)
        if entry.record.size_bytes != size:
            self.store.set_size(model_id, size)
        self._record_signature(entry)
        # Consume the model's queue, and mark the copy LOADED in the same round trip that
        # rings our command queue's bell, so an idle consumer's wait returns and takes the
        # queue now (the consumer thread adds it on its next turn, queued before the ring).
        self.consumer.consume(model_id, wake=False)
        if not self.store.mark_copy(model_id, self.name, CopyState.LOADED,
                                         ring=self.store.keys.worker_queue(self.name)):  # fmt: skip
            # unregistered (or auto-deleted by a vmodel cutover) while we were loading: undo, and
            # hand back what was taken in meanwhile rather than fail it: a request that came
            # through a vmodel belongs to the vmodel's new active (the drain, or the stray sweep,
            # moves it there), any other is answered NOT_FOUND by the stray sweep (the soak
            # failed one vmodel request here with "was unregistered")
            self._unload(model_id, None)
            return
        if entry.state != "LOADED":
            # evicted by a concurrent load before its copy was announced: its retirement may
            # have removed the copy record before we wrote it (the retire thread runs in order)
            self._retirer.submit(self._drop_copy_unless_held, model_id)
        self.consumer.update_prefetch()
        self.events.copy_loaded(model_id)

    def _record_signature(self, entry: Entry) -> None:
        """The model's signature where clients read it (`MeshClient.get_model_metadata`), once
        per registration and worker process: a reload measures the same (models are immutable)."""
        record, loaded = entry.record, entry.loaded
        key = (entry.model_id, record.created_at)
        if loaded is None or key in self._signed:
            return
        try:
            self.store.set_signature(entry.model_id, model_signature(loaded, record.info.runtime, record.created_at))
            self._signed[key] = True
        except Exception:  # metadata is for humans and gateways: never a reason to fail a load
            log.exception("could not record the signature of %s", entry.model_id)

    def _reassert(self, model_id: str) -> None:
        self.store.mark_copy(model_id, self.name, CopyState.LOADED)

    def _candidates(self, waiting: Mapping[str, int] | None) -> list[Candidate]:
        """The loaded models as the retention policy sees them (lock held). `waiting`: the
        requests buffered per model (read before the lock: the batcher has its own)."""
        now, wall = time.monotonic(), time.time()
        waiting = waiting or {}
        return [
            Candidate(
                m,
                self._usage.score(m, now) + waiting.get(m, 0) + e.inflight,
                e.touched,
                fresh=not e.served and wall - e.loaded_at < FRESH_S,
                size=e.size_bytes,
            )
            for m, e in self._cache.items()
        ]

    def _evict_until_fits(self, needed: int, waiting: Mapping[str, int] | None = None) -> None:
        """Evict the policy's victims until `needed` more bytes fit (lock held), or as far as
        retention.make_room holds fresh copies above capacity instead."""
        used = self._cache.currsize + self._reserved
        if used + needed <= self.capacity:  # it fits: no candidates to score
            self._over = False
            return
        victims = make_room(
            self._candidates(waiting), self.eviction_policy, used=used, needed=needed,
            capacity=self.capacity, overcommit=self.overcommit,
        )  # fmt: skip
        for model_id in victims:
            victim = self._cache.pop(model_id)
            self._victims.append(victim)
            victim.state = "EVICTING"
            log.info("evicting %s (%d bytes) to make room", victim.model_id, victim.size_bytes)
        self._over = self._cache.currsize + self._reserved + needed > self.capacity

    def _retire_victims_soon(self) -> None:
        """Retire the evicted models on the retire thread, in eviction order, once fewer than
        RETIRE_BACKLOG earlier retirements (a trim's too) are still running."""
        with self._lock:
            victims, self._victims[:] = list(self._victims), []
        if not victims:
            return
        with self._retiring_lock:  # loader threads (MESH_LOADING_CONCURRENCY) share the backlog
            while self._retiring and (self._retiring[0].done() or len(self._retiring) >= RETIRE_BACKLOG):
                self._retiring.popleft().result()
            self._retiring.append(self._retirer.submit(self._retire_all, victims))

    def _drop_copy_unless_held(self, model_id: str) -> None:
        with self._lock:
            if model_id in self._entries:
                return
        self.store.remove_copy(model_id, self.name)

    def _retire_all(self, victims: list[Entry]) -> None:
        for victim in victims:
            try:
                self._retire(victim, fail_with=None)
            except Exception:  # one failed retirement must not keep the others in memory
                log.exception("retiring %s failed", victim.model_id)

    def _unload(self, model_id: str, fail_with: MeshError | None) -> None:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.state == "LOADING":
                # nothing here (or a load that will find the record gone and undo itself)
                if fail_with is not None:
                    self.events.fail_model(model_id, fail_with)
                return
            if entry.state == "EVICTING":
                return
            del self._cache[model_id]
            entry.state = "EVICTING"
            if fail_with is not None:  # unregistered: a model registered again starts afresh
                self._usage.forget(model_id)
                self._proven.pop(model_id, None)
        self._retire(entry, fail_with)

    def _retire(self, entry: Entry, fail_with: MeshError | None) -> None:
        """Stop intake, let buffered requests finish (bounded), requeue the rest, unload."""
        model_id = entry.model_id
        if fail_with is not None:
            self.events.fail_model(model_id, fail_with)
        else:
            self.consumer.stop_consuming(model_id)
            self.batcher.seal(model_id)
            self.batcher.wait_empty(model_id, self.evict_grace_s)
            self.consumer.requeue(self.batcher.close(model_id), wait_s=5.0)
        with self._inflight:
            while entry.inflight:
                self._inflight.wait(1.0)
        with self._lock:
            if self._entries.get(model_id) is entry:
                del self._entries[model_id]
        if entry.loaded is not None:
            held = entry.loaded.runtime.held(entry.loaded.model)  # before unload, which may clear it
            try:
                entry.loaded.runtime.unload(entry.loaded.model)
            except Exception:
                log.exception("runtime unload of %s raised; dropping it anyway", model_id)
            if self.collector is not None:
                self.collector.evicted(model_id, held)
            del held
        entry.loaded = None
        self.metrics.unloads.labels(model_id, "unregistered" if fail_with is not None else "evicted").inc()
        release_model(model_id)  # its files may now leave the disk cache (LRU)
        with self._lock:
            newer = model_id in self._entries  # a load of it began meanwhile: its record stays
        if not newer:
            self.store.remove_copy(model_id, self.name)
        self.consumer.update_prefetch()
        self.events.copy_unloaded(model_id, unregistered=fail_with is not None)
        with self._lock:
            again = model_id in self._load_after_retire
            self._load_after_retire.discard(model_id)
        if again:
            self.request_load(model_id)

    def take_out(self, model_id: str, entry: Entry, message: str) -> None:
        """A copy whose predict hung (the inference watchdog, any thread): out of service now.
        Its buffered requests go back to their queue, and its model is handled as a failed
        load (`CopyEvents.load_failed`: a failure record here, a load elsewhere, or the
        requests answered with the failure). Not retired the usual way: that waits for the
        copy's running batch, which may never end; nor unloaded under the thread still in its
        predict: its memory is freed when that thread lets go of it, if ever."""
        with self._lock:
            if self._entries.get(model_id) is entry:
                del self._entries[model_id]
                self._cache.pop(model_id, None)
            self._proven.pop(model_id, None)  # a next load here is a first load (no early intake)
            entry.state = "EVICTING"
        threading.Thread(target=self._take_out, args=(entry, message), name=f"mesh-takeout-{model_id}",
                         daemon=True).start()  # fmt: skip

    def _take_out(self, entry: Entry, message: str) -> None:
        model_id = entry.model_id
        try:
            self.consumer.stop_consuming(model_id)
            self.consumer.requeue(self.batcher.close(model_id), wait_s=5.0)
            self.metrics.unloads.labels(model_id, "hung").inc()
            release_model(model_id)
            self.store.remove_copy(model_id, self.name)
            self.consumer.update_prefetch()
            self.events.load_failed(model_id, message)
        except Exception:  # Redis away: the heartbeat no longer lists the copy; failover handles the rest
            log.exception("taking the hung copy of %s out of service failed", model_id)

    def shutdown(self, wait: bool = False) -> None:
        """No more loads or unloads; those queued are dropped. `wait`: until those running have
        ended, so nothing of theirs is written to Redis after (a test's key prefix is deleted
        once its manager is shut down). Not the guards' threads, nor the snapshots' writer: they
        write nothing to Redis, and a call a load gave up on may hang for good."""
        with self._lock:
            self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)
        self._retirer.shutdown(wait=False, cancel_futures=True)
        self._snapshot_pool.shutdown(wait=False, cancel_futures=True)
        self._guards.shutdown(wait=False, cancel_futures=True)
        if wait:
            # fetch threads run loads too (`_queue_load`), and loads retire copies
            for pool in (self._fetchers, self._pool, self._retirer):
                if pool is not None:
                    pool.shutdown(wait=True)
