"""Results back to their producer: one reply list per producer, popped by those who wait.

Celery's Redis result backend has every waiting `get()` SUBSCRIBE to its task's channel, GET
the record, poll the subscription with short sleeps, then UNSUBSCRIBE (celery/backends/redis.py
`ResultConsumer`): about half of a producer's CPU per request, measured (docs/benchmarks.md).
Here a producer names its reply list in each message's `reply_to` (the protocol field Celery's
own RPC backend uses the same way), and the mesh worker that answers pushes the result record
onto that list in the pipeline that stores it (workers/inference.py, mesh/broker/results.py).
A thread waiting in `get()` pops the list itself, one thread at a time (`ReplyListener.wait`);
one listener thread pops while asyncio code awaits or `then` callbacks wait, and every
SWEEP_AFTER_S for housekeeping. Many records come per round trip under load. The Celery record
is still written: `AsyncResult(id).get()` works from any process, as before.

A handle (`MeshResult`) is a Celery AsyncResult whose wait is local: `get(timeout)`, `ready()`,
`state`, `result`, `successful()`, `forget()`, `then()` keep their meaning, and awaiting it in
asyncio costs no thread. (`ResultSet.join_native` still waits through Celery's pub/sub, which
subscribes after the send: use `join()`, or `asyncio.gather` on the handles.) Failure modes
(docs/reliability.md, "Results"):
- Redis away: the popping threads retry with backoff; records pushed meanwhile wait in the
  list, and once Redis answers, every handle still pending is also looked up in the store.
- the producer gone: nobody pops its list, which expires REPLY_TTL_S after its last push.
- a record that never reaches the list (a worker of an older version, a path that only stores
  it): handles pending longer than SWEEP_AFTER_S are looked up in the result store every
  SWEEP_AFTER_S, and `get(timeout)` looks once more when its timeout ends.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, assert_will_not_block

from mesh.protocol.keys import Keys
from mesh.protocol.messages import REPLY_TTL_S

log = logging.getLogger("mesh.broker.replies")

POP_MAX = 512  # records one LPOP takes when more are waiting
WAIT_S = 1.0  # longest BLPOP: how soon a popping thread notices a stop or runs a sweep
SWEEP_AFTER_S = 2.0  # handles pending this long are also looked up in the result store
SWEEP_CHUNK = 500  # keys per MGET of a sweep
RETRY_MAX_S = 2.0  # backoff ceiling while Redis is away


class MeshResult(AsyncResult):
    """The handle `MeshClient.infer` returns: Celery's AsyncResult, resolved from the reply list."""

    def __init__(self, id: str, *, app: Any, backend: Any = None) -> None:
        super().__init__(id, backend=backend, app=app)
        self.sent = time.monotonic()
        self._reply: dict | None = None
        self._resolved = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._listener: ReplyListener | None = None  # set by ReplyListener.watch
        self._wake: threading.Event | None = None  # set while a thread follows (ReplyListener.wait)
        self._promised = False  # `then` callbacks wait: the popping thread fulfils them

    # ---- resolution (whichever thread pops the reply)
    def _resolve(self, meta: dict) -> tuple[list[tuple[asyncio.AbstractEventLoop, asyncio.Future]], bool]:
        """Record the final meta; returns the asyncio futures to wake (the caller wakes them
        grouped per loop: one cross-thread call per loop and drain, not per request) and
        whether `then` callbacks wait (the caller runs them: `_fulfil`)."""
        with self._lock:
            if self._reply is not None:
                return [], False
            self._reply = meta
            waiters, self._waiters = self._waiters, []
            wake, promised = self._wake, self._promised
        self._resolved.set()
        if wake is not None:
            wake.set()
        return waiters, promised

    @property
    def _arrived(self) -> bool:
        """The reply is here. What the listener's waiting threads check, rather than
        `_resolved`: `_resolve` records the reply and reads `_wake` under `_lock`, then sets
        `_resolved`, so a thread that registered its wake in between is woken by nobody and
        would see `_resolved` still unset, and sleep to its timeout (a 20,000-request
        closedloop zipf run: one get() answered at its 120 s timeout). (`forget` clears the
        reply, not `_resolved`.)"""
        return self._reply is not None or self._resolved.is_set()

    def _fulfil(self) -> None:
        """Run the `then` callbacks (Celery fulfils `on_ready` when it sets the cache)."""
        try:
            self._get_task_meta()
        except Exception:  # a callback's error must not stop the popping
            log.exception("a callback of result %s failed", self.id)

    def then(self, callback: Callable[..., Any], on_error: Callable[..., Any] | None = None, weak: bool = False) -> Any:
        """Celery's promise API: `callback(self)` runs once the result is here, on the thread
        that pops its reply (the listener's thread pops while callbacks wait). Celery's own
        `then` subscribes to the task's channel after the send, which misses a result stored in
        between."""
        p = self.on_ready.then(callback, on_error)
        with self._lock:
            arrived = self._reply is not None
            first = not arrived and not self._promised and not self._waiters
            if not arrived:
                self._promised = True
        if arrived:
            self._fulfil()
        elif first and self._listener is not None:
            self._listener.awaited()
        return p

    # ---- AsyncResult's API
    def _get_task_meta(self) -> dict:
        if self._cache is None and self._reply is not None:
            # the cache is set in the reader's thread: it calls into this thread's backend
            self._maybe_set_cache(self._reply)
        return super()._get_task_meta()

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        """Wait for the result (see AsyncResult.get); TimeoutError after `timeout` seconds."""
        if self.ignored:
            return None
        if kwargs.get("disable_sync_subtasks", True):
            assert_will_not_block()
        if self._cache is None:
            listener = self._listener
            if listener is not None:
                listener.wait(self, timeout)
            else:
                self._resolved.wait(timeout)
            # resolved: the cache is set from the reply. Not: one look in the result store
            # before giving up, for a record that missed the list.
            if self._get_task_meta()["status"] not in states.READY_STATES:
                raise CeleryTimeoutError("The operation timed out.")
        return super().get(timeout=timeout, propagate=propagate, **kwargs)

    def forget(self) -> None:
        self._reply = None
        super().forget()

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        return self.get(*args, **kwargs)

    def __await__(self):
        if self._cache is None:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            with self._lock:
                waiting = self._reply is None
                if waiting:
                    first = not self._waiters and not self._promised
                    self._waiters.append((loop, future))
            if waiting:
                if first and self._listener is not None:
                    self._listener.awaited()
                try:
                    yield from future.__await__()
                except BaseException:  # this await was cancelled (a timeout, a caller gone)
                    self._unwait(loop, future)
                    raise
        return self.get(timeout=0, disable_sync_subtasks=False)

    def _unwait(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        """Forget a cancelled await. The handle stays watched (the request was not cancelled:
        a later `get()` or await still gets its reply), but once nothing awaits it the
        listener's thread no longer pops for it. Whoever owns the request discards the handle
        (`ReplyListener.discard`) when nobody will ask for its reply, as `infer_async` does."""
        with self._lock:
            try:
                self._waiters.remove((loop, future))
            except ValueError:  # resolved meanwhile: `_deliver` counted it settled
                return
            last = not self._waiters and not self._promised
        if last and self._listener is not None:
            self._listener.unawaited()


class ReplyListener:
    """One producer's reply list, drained by the threads that wait on it.

    A thread in `get()` pops the list itself while no other thread does (one hand-over less
    on a lone request's path), and hands the popping over to another waiting thread when its
    own reply has come; replies it pops for other handles resolve them. The listener's own
    thread pops while asyncio code awaits handles (no thread of theirs waits), and every
    SWEEP_AFTER_S otherwise, to take replies nobody waits on off the list and to look up
    handles pending that long in the result store.

    `client`: a Redis client of the result store, the listener's own (it blocks on its
    connections, and `close` disconnects them). `meta_key(task_id)`: a task's result record
    key. `decode`: record bytes -> meta.
    """

    def __init__(self, client: redis.Redis, keys: Keys, meta_key: Callable[[str], str],
                 decode: Callable[[bytes], dict]) -> None:  # fmt: skip
        self.key = keys.reply_list(uuid4().hex)
        self.pid = os.getpid()
        self._client = client
        self._meta_key = meta_key
        self._decode = decode
        self._pending: weakref.WeakValueDictionary[str, MeshResult] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()  # guards _pending, _followers, _awaited
        self._popping = threading.Lock()  # held by the one thread popping the list
        self._followers: deque[MeshResult] = deque()  # handles whose threads wait for their turn
        self._awaited = 0  # unresolved handles awaited in asyncio
        self._need = threading.Event()  # wakes the listener's thread (an await, a stop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = time.monotonic()
        self._resweep = False  # Redis was away: look up every pending handle once it is back

    def watch(self, handle: MeshResult) -> None:
        """Resolve `handle` when its reply arrives. A handle nobody references any more is
        dropped: its reply, if it comes, is discarded."""
        handle._listener = self
        with self._lock:
            self._pending[handle.id] = handle
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mesh-replies", daemon=True)
                self._thread.start()

    def discard(self, task_id: str) -> None:
        with self._lock:
            self._pending.pop(task_id, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def awaited(self) -> None:
        """A handle is now awaited in asyncio (or has `then` callbacks): the listener's thread
        pops until it resolves."""
        with self._lock:
            self._awaited += 1
        self._need.set()

    def unawaited(self) -> None:
        """A handle's last await was cancelled before its reply came (and no `then` callback
        waits): the listener's thread stops popping for it."""
        with self._lock:
            self._awaited -= 1

    def awaiting(self) -> int:
        """Unresolved handles awaited in asyncio or with `then` callbacks (the listener's
        thread pops while there are any)."""
        with self._lock:
            return self._awaited

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the client (its own): a BLPOP under way is cut short."""
        self._stop.set()
        self._need.set()
        self._client.connection_pool.disconnect()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- waiting threads
    def wait(self, handle: MeshResult, timeout: float | None) -> bool:
        """Block until `handle` resolves (True) or `timeout` seconds pass (False), popping the
        list while no other thread does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0
        while not handle._arrived:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not self._popping.acquire(blocking=False):
                if self._follow(handle, remaining):
                    continue
            try:
                while not handle._arrived and not self._stop.is_set():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    try:
                        self._pop(WAIT_S if remaining is None else min(remaining, WAIT_S))
                        delay = 0.0
                    except redis.RedisError as exc:
                        delay = self._away(exc, delay)
                        time.sleep(delay if remaining is None else max(0.0, min(delay, remaining)))
            finally:
                self._popping.release()
                self._hand_over()
            if self._stop.is_set():  # closed: nothing pops any more
                return handle._arrived
        return True

    def _follow(self, handle: MeshResult, remaining: float | None) -> bool:
        """Wait while another thread pops: until `handle` resolves, that thread hands the
        popping over, or `remaining` passes. False: the popping was free after all, and is now
        ours (taken after registering, so a hand-over in between is not missed)."""
        wake = threading.Event()
        with handle._lock:
            if handle._arrived:  # `_resolve` found no wake to set
                return True
            handle._wake = wake
        with self._lock:
            self._followers.append(handle)
        try:
            if not handle._arrived and self._popping.acquire(blocking=False):
                return False
            wake.wait(remaining)
            return True
        finally:
            with handle._lock:
                handle._wake = None
            with self._lock:
                try:
                    self._followers.remove(handle)
                except ValueError:  # handed over: already taken off
                    pass

    def _hand_over(self) -> None:
        """After letting the popping go: wake the first thread still waiting for its reply (and
        the listener's thread if asyncio code awaits)."""
        with self._lock:
            while self._followers:
                handle = self._followers.popleft()
                wake = handle._wake
                if wake is not None and not handle._arrived:
                    wake.set()
                    break
            awaited = self._awaited > 0
        if awaited:
            self._need.set()

    # ---- the listener's thread
    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            with self._lock:
                awaited = self._awaited > 0
            if not awaited:
                self._need.wait(SWEEP_AFTER_S)
                self._need.clear()
            with self._lock:
                awaited = self._awaited > 0
            if self._stop.is_set() or not self._popping.acquire(timeout=WAIT_S if awaited else 0):
                continue
            try:
                self._pop(WAIT_S if awaited else 0.0)
                delay = 0.0
            except redis.RedisError as exc:
                if self._stop.is_set():
                    return
                delay = self._away(exc, delay)
                self._stop.wait(delay)
            except Exception:  # a reply that cannot be handled must not end the thread
                log.exception("a reply on %s could not be handled", self.key)
            finally:
                self._popping.release()
                self._hand_over()

    # ---- popping (the one thread holding _popping)
    def _pop(self, block_s: float) -> None:
        """Deliver what waits on the list; if nothing does, wait up to `block_s` for a reply."""
        if self._resweep:
            self._sweep(everything=True)
            self._resweep = False
        client = self._client
        with self._lock:
            busy = len(self._pending) > 1
        # at one request in flight a reply is awaited with BLPOP alone; with more, one LPOP
        # first takes everything already waiting
        records = client.lpop(self.key, POP_MAX) if busy or not block_s else None
        if not records and block_s:
            popped = client.blpop([self.key], timeout=block_s)
            records = [popped[1]] if popped else []
        if records:
            self._deliver(records)
        while not block_s and records and len(records) == POP_MAX:  # housekeeping: all of it
            records = client.lpop(self.key, POP_MAX)
            if records:
                self._deliver(records)
        if time.monotonic() - self._last_sweep >= SWEEP_AFTER_S:
            self._sweep()

    def _away(self, exc: Exception, delay: float) -> float:
        """Redis did not answer: the next delay of a backoff, and a full sweep once it is back."""
        if not delay:
            log.warning("reply list %s unreachable (%s); retrying until Redis answers", self.key, exc)
        self._resweep = True  # what was stored meanwhile may have missed the list
        return min(RETRY_MAX_S, max(0.05, delay * 2))

    def _deliver(self, records: list) -> None:
        metas = []
        for raw in records:
            try:
                meta = self._decode(raw)
            except Exception:  # garbage on the list must not stop the popping
                log.warning("dropped an undecodable reply on %s: %r", self.key, bytes(raw[:80]))
                continue
            if isinstance(meta, dict) and meta.get("status") in states.READY_STATES:
                metas.append(meta)
        with self._lock:  # once per drain, not per record (a drain takes up to POP_MAX)
            found = [(h, m) for m in metas if (h := self._pending.pop(str(m.get("task_id")), None)) is not None]
        wake: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        settled = 0  # awaited handles resolved
        for handle, meta in found:
            waiters, promised = handle._resolve(meta)
            settled += bool(waiters or promised)
            if promised:
                handle._fulfil()
            for loop, future in waiters:
                wake.setdefault(loop, []).append(future)
        if settled:
            with self._lock:
                self._awaited -= settled
        for loop, futures in wake.items():
            try:
                loop.call_soon_threadsafe(_wake, futures)
            except RuntimeError:  # that loop is closed: nobody awaits these any more
                pass

    def _sweep(self, everything: bool = False) -> None:
        """Look up handles pending for a while in the result store (records that missed the
        list); with `everything`, all pending ones (after Redis came back)."""
        now = time.monotonic()
        self._last_sweep = now
        with self._lock:
            due = [h for h in self._pending.values() if everything or now - h.sent >= SWEEP_AFTER_S]
        for i in range(0, len(due), SWEEP_CHUNK):
            chunk = due[i : i + SWEEP_CHUNK]
            raws = self._client.mget([self._meta_key(h.id) for h in chunk])
            self._deliver([raw for raw in raws if raw])


def _wake(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # a cancelled await leaves a cancelled future
            future.set_result(None)


__all__ = ["MeshResult", "ReplyListener", "REPLY_TTL_S"]
