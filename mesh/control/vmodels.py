"""VModels: aliases with a zero-downtime cutover (ModelMesh's VModelManager, modelmesh.md §1).

Two halves, one class (`VModelManager`):

- The store. Every change to a vmodel record, to the reference counts (`ModelRecord.refs`) of
  the models it names, and the auto-deletion of a model nobody references any more is ONE
  Redis transaction: WATCH over the models and vmodels hashes (plus the copies of a model
  being deleted), MULTI, EXEC, retried on conflict. A vmodel holds exactly one reference on
  each distinct model it names ({active, target}); references move by set difference, which
  is what keeps ModelMesh's two refcount leaks out (forced re-switch to the pending target,
  and cancelling a transition, each add a second reference there).
- The transition driver. `advance(vmodel_id)` loads the target to as many copies as the active
  has, switches atomically once they are LOADED, marks the transition blocked by a failed load
  (TRANSITION_FAILED) and retries it when the failure records expire. The decisions are
  mesh/policy/cutover.py's pure functions. It runs from `set_vmodel` (a change that can complete at
  once does), from a worker as soon as a target copy is loaded (`advance_for_model`), from a
  `sync=True` caller while it waits, and from the beat scheduler (`advance_all`) for the rest.

Auto-deleted models leave the registry inside the transaction (NOT_FOUND at once, like
ModelMesh), but their copies are unloaded only once the requests already routed to them are
answered (`drain_all`, see cutover.drain_decision): a cutover under traffic fails nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict

from mesh.control.commands import send_command, unload_unregistered
from mesh.policy.cutover import (
    Action,
    Decision,
    DrainAction,
    HolderReport,
    ModelView,
    copies_after_set,
    decide,
    drain_decision,
    may_switch_now,
)
from mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    MeshError,
    ModelNotFound,
    Unavailable,
)
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.models import (
    Command,
    CopyState,
    ModelInfo,
    ModelRecord,
    ModelState,
    VModelRecord,
    VModelState,
    VModelStatus,
    WorkerState,
)
from mesh.store.state import Route, StateStore

log = logging.getLogger("mesh.control.vmodels")

SYNC_TIMEOUT_S = 240.0  # ModelMesh's hard-coded 4 minutes for a sync set_vmodel
DRAIN_GRACE_S = 1.0  # a producer that resolved the old active just before the switch
DRAIN_MAX_S = 60.0  # copies of an auto-deleted model go at the latest after this
LOCK_TTL_MS = 10_000
MAX_RERUNS = 8
MAX_TX_ATTEMPTS = 200

T = TypeVar("T")

# advance() is serialised per vmodel so two drivers (beat, a worker's hook, a sync caller) never
# place the same missing copy twice. A driver that finds the lock taken marks the vmodel dirty
# and leaves: the holder runs once more before releasing, so no wake-up is lost.
_LOCK_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""
_LOCK_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
"""
# Drain entries change only if nobody rewrote them meanwhile (a second auto-delete of the id).
_CAS_HASH_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""


class DrainEntry(BaseModel):
    """An auto-deleted model whose copies still answer the requests routed to it before."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    info: ModelInfo  # to tell a later re-registration of the same id from this model
    holders: list[str]  # workers that held a copy when the record was deleted
    since: float
    drained_at: float | None = None  # when its queue was first seen empty


@dataclass
class SetOutcome:
    """What one `set` transaction did."""

    record: VModelRecord | None
    created_vmodel: bool = False
    created_model: bool = False
    switched: bool = False  # the active changed in this call
    wrote: bool = False
    previous_active_copies: int = 0
    auto_deleted: list[str] = field(default_factory=list)


class _Tx:
    """Reads under WATCH and the writes staged for one MULTI/EXEC."""

    def __init__(self, pipe: redis.client.Pipeline, keys: Keys) -> None:
        self.p = pipe
        self.k = keys
        self.now = time.time()
        self._models: dict[str, ModelRecord | None] = {}
        self.model_writes: dict[str, ModelRecord] = {}
        self.model_deletes: dict[str, DrainEntry] = {}
        self.vmodel_write: VModelRecord | None = None
        self.vmodel_delete: str | None = None
        self.notes: list[str] = []  # anomalies, logged only if the transaction commits
        self._draining_watched = False

    def vmodel(self, vmodel_id: str) -> VModelRecord | None:
        raw = self.p.hget(self.k.vmodels, vmodel_id)
        return None if raw is None else VModelRecord.model_validate_json(raw)

    def model(self, model_id: str) -> ModelRecord | None:
        if model_id in self.model_writes:
            return self.model_writes[model_id]
        if model_id not in self._models:
            raw = self.p.hget(self.k.models, model_id)
            self._models[model_id] = None if raw is None else ModelRecord.model_validate_json(raw)
        return self._models[model_id]

    def add_model(self, record: ModelRecord) -> None:
        self.model_writes[record.model_id] = record

    def move_references(self, before: VModelRecord | None, after: VModelRecord | None) -> list[str]:
        """Shift reference counts from `before`'s models to `after`'s; returns the models this
        auto-deletes (their last reference went and they were created for a vmodel)."""
        old = before.references if before else frozenset()
        new = after.references if after else frozenset()
        for model_id in sorted(new - old):
            rec = self.model(model_id)
            if rec is None:  # callers check the target exists before; defensive
                raise ModelNotFound(f"model {model_id!r} not found")
            self.model_writes[model_id] = rec.model_copy(update={"refs": rec.refs + 1})
        deleted = []
        for model_id in sorted(old - new):
            rec = self.model(model_id)
            if rec is None:
                self.notes.append(f"a vmodel referenced model {model_id!r}, which is not registered")
                continue
            if rec.refs <= 0:
                self.notes.append(f"reference count of {model_id!r} was already {rec.refs}")
            refs = max(0, rec.refs - 1)
            if refs == 0 and rec.auto_delete:
                self._stage_delete(rec)
                deleted.append(model_id)
            else:
                self.model_writes[model_id] = rec.model_copy(update={"refs": refs})
        return deleted

    def _stage_delete(self, rec: ModelRecord) -> None:
        k = self.k
        self.model_writes.pop(rec.model_id, None)
        # the copies and the drain list are read under WATCH too: a copy recorded, or another
        # drain of the same id, between this read and EXEC aborts and retries the transaction
        self.p.watch(k.copies(rec.model_id))
        if not self._draining_watched:
            self.p.watch(k.draining)
            self._draining_watched = True
        holders = {w.decode() for w in self.p.hkeys(k.copies(rec.model_id))}
        raw = self.p.hget(k.draining, rec.model_id)
        if raw is not None:
            holders |= set(DrainEntry.model_validate_json(raw).holders)
        self.model_deletes[rec.model_id] = DrainEntry(
            model_id=rec.model_id, info=rec.info, holders=sorted(holders), since=self.now
        )

    def commit(self) -> None:
        """MULTI/EXEC the staged writes (none: EXEC still validates the reads)."""
        k, p = self.k, self.p
        p.multi()
        for model_id, rec in self.model_writes.items():
            p.hset(k.models, model_id, rec.model_dump_json())
        for model_id, entry in self.model_deletes.items():
            p.hdel(k.models, model_id)
            p.delete(k.copies(model_id), k.failures(model_id), k.load_claim(model_id),
                     *k.queue_bindings(k.model_queue(model_id)))
            p.hset(k.draining, model_id, entry.model_dump_json())
        if self.vmodel_write is not None:
            vm = self.vmodel_write
            p.hset(k.vmodels, vm.vmodel_id, vm.model_dump_json())
            if vm.in_transition:
                p.hset(k.transitions, vm.vmodel_id, vm.target_model_id)
            else:
                p.hdel(k.transitions, vm.vmodel_id)
        if self.vmodel_delete is not None:
            p.hdel(k.vmodels, self.vmodel_delete)
            p.hdel(k.transitions, self.vmodel_delete)
        p.execute()


class VModelManager:
    """The vmodel store and transition driver for one mesh (one key prefix).

    Cheap to construct; safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        app: Celery,
        store: StateStore,
        *,
        drain_grace_s: float = DRAIN_GRACE_S,
        drain_max_s: float = DRAIN_MAX_S,
    ) -> None:
        self.app = app
        self.store = store
        self.r: redis.Redis = store.r
        self.keys: Keys = store.keys
        self.drain_grace_s = drain_grace_s
        self.drain_max_s = drain_max_s
        self.name = f"vmodels:{socket.gethostname()}:{os.getpid()}"
        self._acquire = self.r.register_script(_LOCK_ACQUIRE_LUA)
        self._release = self.r.register_script(_LOCK_RELEASE_LUA)
        self._cas_hash = self.r.register_script(_CAS_HASH_LUA)

    # ================================================================== store

    def _transact(self, body: Callable[[_Tx], T]) -> T:
        """Run `body` (reads, then staged writes) and commit it atomically, retrying on conflict.

        Reads under WATCH are not a snapshot: a concurrent commit between two of them shows a
        state that never existed. So every outcome is validated by EXEC, even one that writes
        nothing or raises: a no-op or an error decided on such reads is retried too.
        """
        k = self.keys
        with self.r.pipeline() as p:
            for _ in range(MAX_TX_ATTEMPTS):
                try:
                    p.watch(k.models, k.vmodels)
                    tx = _Tx(p, k)
                    try:
                        result = body(tx)
                    except MeshError:
                        p.multi()
                        p.execute()  # raises WatchError if the reads were not consistent
                        raise
                    tx.commit()
                    for note in tx.notes:
                        log.warning("%s", note)
                    return result
                except redis.WatchError:
                    continue
                finally:
                    p.reset()
        raise Unavailable("vmodel update kept conflicting with concurrent changes; try again")

    def get(self, vmodel_id: str) -> VModelRecord | None:
        raw = self.r.hget(self.keys.vmodels, validate_id(vmodel_id, "vmodel"))
        return None if raw is None else VModelRecord.model_validate_json(raw)

    def list(self) -> list[VModelRecord]:
        raw = self.r.hgetall(self.keys.vmodels)
        return sorted((VModelRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.vmodel_id)

    def set(
        self,
        vmodel_id: str,
        target_model_id: str,
        *,
        model_info: ModelInfo | None = None,
        auto_delete_target_model: bool = False,
        update_only: bool = False,
        force: bool = False,
        expected_target_model_id: str | None = None,
        owner: str | None = None,
    ) -> SetOutcome:
        """The record change of `setVModel` (modelmesh.md §1.2), one transaction; no waiting.

        Errors, in ModelMesh's order: compare-and-set (`expected_target_model_id`) fails with
        FAILED_PRECONDITION (or ALREADY_EXISTS for another owner); a missing target without
        `model_info` is NOT_FOUND, an existing target with different info ALREADY_EXISTS;
        another owner's vmodel ALREADY_EXISTS; `update_only` on a missing vmodel NOT_FOUND.
        """
        validate_id(vmodel_id, "vmodel")
        validate_id(target_model_id)
        expected = expected_target_model_id or None
        if expected is not None:
            validate_id(expected)
        owner = owner or None
        workers = self._eligible_workers()

        def body(tx: _Tx) -> SetOutcome:
            vm = tx.vmodel(vmodel_id)
            target = target_model_id
            if expected is not None:
                if vm is None:
                    if expected != target:
                        raise FailedPrecondition(
                            f"vmodel {vmodel_id!r} not found (expected target {expected!r})"
                        )
                elif owner is not None and vm.owner != owner:
                    raise AlreadyExists(f"vmodel {vmodel_id!r} already exists with a different owner")
                elif vm.target_model_id not in (expected, target):
                    raise FailedPrecondition(
                        f"target model {vm.target_model_id!r} of vmodel {vmodel_id!r} "
                        f"does not match expected {expected!r}"
                    )
            trec = tx.model(target)
            if model_info is None:
                if trec is None:
                    raise ModelNotFound(f"target model {target!r} not found")
            elif trec is not None and not trec.info.same_model(model_info):
                raise AlreadyExists(
                    f"target model {target!r} already exists with different info "
                    "(models are immutable: use a new id)"
                )
            out = SetOutcome(record=vm)
            if vm is None:
                if update_only:
                    raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
                new = VModelRecord(
                    vmodel_id=vmodel_id, owner=owner or "", active_model_id=target, target_model_id=target
                )
                out.created_vmodel = True
            else:
                if owner is not None and vm.owner != owner:
                    raise AlreadyExists(f"vmodel {vmodel_id!r} already exists with owner {vm.owner!r}")
                if target == vm.target_model_id and (target == vm.active_model_id or not force):
                    # steady state, or already transitioning to it: nothing to write
                    return out
                new = vm.model_copy(
                    update={"target_model_id": target, "target_load_failed": False, "updated_at": tx.now}
                )
                if target != vm.active_model_id:
                    active_view = self._view(vm.active_model_id)
                    # a target created by this call is registered once we commit, with no copy
                    target_view = self._view(target) if trec is not None else ModelView()
                    out.previous_active_copies = len(active_view.loaded)
                    if may_switch_now(active_view, target_view, workers, force):
                        new.active_model_id = target
                        out.switched = True
            if model_info is not None and trec is None:
                tx.add_model(
                    ModelRecord(model_id=target, info=model_info, auto_delete=auto_delete_target_model)
                )
                out.created_model = True
            out.auto_deleted = tx.move_references(vm, new)
            tx.vmodel_write = new
            out.record = new
            out.wrote = True
            return out

        outcome = self._transact(body)
        if outcome.wrote:
            rec = outcome.record
            log.info(
                "vmodel %s: active %s, target %s%s%s", vmodel_id, rec.active_model_id, rec.target_model_id,
                " (switched)" if outcome.switched else "",
                f"; auto-deleted {outcome.auto_deleted}" if outcome.auto_deleted else "",
            )  # fmt: skip
        self.drain_all()  # the models just auto-deleted, if they need no draining, and older ones
        return outcome

    def delete(self, vmodel_id: str, owner: str | None = None) -> list[str]:
        """`deleteVModel`: idempotent; a vmodel of another owner is left alone (silently).
        Returns the models auto-deleted with it."""
        validate_id(vmodel_id, "vmodel")
        owner = owner or None

        def body(tx: _Tx) -> list[str]:
            vm = tx.vmodel(vmodel_id)
            if vm is None or (owner is not None and vm.owner != owner):
                return []
            deleted = tx.move_references(vm, None)
            tx.vmodel_delete = vmodel_id
            return deleted

        deleted = self._transact(body)
        if deleted:
            log.info("vmodel %s deleted; auto-deleted %s", vmodel_id, deleted)
        self.drain_all()
        return deleted

    def status(self, vmodel_id: str, owner: str | None = None) -> VModelStatus:
        """`getVModelStatus`: NOT_FOUND (empty ids) when absent or owned by someone else."""
        validate_id(vmodel_id, "vmodel")
        owner = owner or None
        missing = VModelStatus(vmodel_id=vmodel_id, status=VModelState.NOT_FOUND)
        rec = self.get(vmodel_id)
        if rec is None or (owner is not None and rec.owner != owner):
            return missing
        active = self.store.model_status(rec.active_model_id)
        if active.state is ModelState.NOT_FOUND:
            # the active may have just been switched (and auto-deleted): read once more (§1.3)
            again = self.get(vmodel_id)
            if again is None or (owner is not None and again.owner != owner):
                return missing
            if again.active_model_id != rec.active_model_id:
                active = self.store.model_status(again.active_model_id)
            rec = again
        target = self.store.model_status(rec.target_model_id) if rec.in_transition else None
        if not rec.in_transition:
            state = VModelState.DEFINED
        elif rec.target_load_failed:
            state = VModelState.TRANSITION_FAILED
        else:
            state = VModelState.TRANSITIONING
        return VModelStatus(
            vmodel_id=vmodel_id,
            status=state,
            active_model_id=rec.active_model_id,
            target_model_id=rec.target_model_id,
            owner=rec.owner,
            active_model_state=active.state,
            target_model_state=target.state if target else None,
            active_model_copies=active.copies,
            active_model_failed_copies=active.failed_copies,
            target_model_copies=target.copies if target else [],
            target_model_failed_copies=target.failed_copies if target else [],
            errors=(target or active).errors,
        )

    # ================================================================== set_vmodel, in full

    def set_vmodel(
        self,
        vmodel_id: str,
        target_model_id: str,
        *,
        model_info: ModelInfo | None = None,
        auto_delete_target_model: bool = False,
        update_only: bool = False,
        load_now: bool = False,
        force: bool = False,
        sync: bool = False,
        expected_target_model_id: str | None = None,
        owner: str | None = None,
        timeout: float = SYNC_TIMEOUT_S,
    ) -> VModelStatus:
        """`setVModel` with its post-processing: start loading, and with `sync` wait.

        - transition left pending: drive it now (load the target to the active's scale; switch
          if that is already done); `sync` waits until it completes, fails (target load
          failed), or is superseded (vmodel deleted or retargeted).
        - no transition pending (created, switched at once, or unchanged): ensure the previous
          active's number of copies of the model, else one copy if `load_now`; `sync` then
          waits for that load.
        `sync` raises DeadlineExceeded after `timeout` seconds (the change itself is made).
        """
        outcome = self.set(
            vmodel_id,
            target_model_id,
            model_info=model_info,
            auto_delete_target_model=auto_delete_target_model,
            update_only=update_only,
            force=force,
            expected_target_model_id=expected_target_model_id,
            owner=owner,
        )
        rec = outcome.record
        deadline = time.monotonic() + timeout
        in_transition = not outcome.created_vmodel and rec is not None and rec.in_transition
        if in_transition:
            self.advance(vmodel_id)
            if sync:
                self._wait_transition(vmodel_id, target_model_id, deadline, timeout)
        else:
            count = copies_after_set(
                outcome.previous_active_copies, load_now, len(self._eligible_workers())
            )
            if count > 0:
                self.ensure_copies(target_model_id, count)
                if sync:
                    self._wait_loaded(target_model_id, deadline, timeout)
        return self.status(vmodel_id)

    def _wait_transition(self, vmodel_id: str, target: str, deadline: float, timeout: float) -> None:
        delay = 0.02
        while True:
            self.advance(vmodel_id)  # drives it without waiting for a beat tick
            rec = self.get(vmodel_id)
            if (
                rec is None
                or rec.target_model_id != target
                or rec.target_load_failed
                or not rec.in_transition
            ):
                return
            if time.monotonic() >= deadline:
                status = self.store.model_status(target)
                loaded = sum(1 for c in status.copies if c.state is CopyState.LOADED)
                raise DeadlineExceeded(
                    f"vmodel {vmodel_id!r} still transitioning from {rec.active_model_id!r} to "
                    f"{target!r} after {timeout:g}s (target {status.state.value}, {loaded} copies "
                    "loaded); the transition continues in the background"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    def _wait_loaded(self, model_id: str, deadline: float, timeout: float) -> None:
        delay = 0.02
        done = (ModelState.LOADED, ModelState.LOADING_FAILED, ModelState.NOT_FOUND)
        while True:
            status = self.store.model_status(model_id)
            if status.state in done:
                return
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"model {model_id!r} still {status.state.value} after {timeout:g}s"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    # ================================================================== transition driver

    def advance(self, vmodel_id: str, workers: list[WorkerState] | None = None) -> Decision | None:
        """Drive one vmodel's pending transition one step; returns what was decided (None when
        there is nothing to do, or another driver is on it right now and will run again)."""
        validate_id(vmodel_id, "vmodel")
        k = self.keys
        lock_keys = [k.vmodel_lock(vmodel_id), k.vmodel_dirty(vmodel_id)]
        token = uuid.uuid4().hex
        if not self._acquire(keys=lock_keys, args=[token, LOCK_TTL_MS]):
            return None
        decision = None
        held = True
        try:
            for attempt in range(MAX_RERUNS):
                decision = self._advance_once(vmodel_id, workers if attempt == 0 else None)
                if not self._release(keys=lock_keys, args=[token, LOCK_TTL_MS]):
                    held = False
                    break
        finally:
            if held:  # an exception, or too many reruns: let the next driver in
                self._cas_lock_release(lock_keys[0], token)
        return decision

    def _cas_lock_release(self, key: str, token: str) -> None:
        with self.r.pipeline() as p:
            try:
                p.watch(key)
                if p.get(key) == token.encode():
                    p.multi()
                    p.delete(key)
                    p.execute()
            except redis.WatchError:
                pass

    def _advance_once(self, vmodel_id: str, workers: list[WorkerState] | None) -> Decision | None:
        rec = self.get(vmodel_id)
        if rec is None or not rec.in_transition:
            return None
        eligible = self._eligible_workers(workers)
        active = self._view(rec.active_model_id)
        target = self._view(rec.target_model_id)
        decision = decide(
            active=active,
            target=target,
            workers=eligible,
            max_load_attempts=self.store.settings.max_load_attempts,
            failed_flag=rec.target_load_failed,
        )
        log.debug("vmodel %s %s -> %s: %s", vmodel_id, rec.active_model_id, rec.target_model_id, decision)
        if decision.action is Action.SWITCH:
            self._complete(rec)
            return decision
        if decision.clear_failed:
            self._set_failed(rec, False)
        if decision.action is Action.LOAD:
            self._place(rec.target_model_id, decision.copies, target)
        elif decision.action is Action.BLOCKED:
            self._set_failed(rec, True)
            log.warning("vmodel %s blocked: %s", vmodel_id, decision.reason)
        return decision

    def _complete(self, seen: VModelRecord) -> bool:
        """Switch active := target, if the vmodel still is what the decision saw."""

        def body(tx: _Tx) -> list[str] | None:
            vm = tx.vmodel(seen.vmodel_id)
            if (
                vm is None
                or vm.active_model_id != seen.active_model_id
                or vm.target_model_id != seen.target_model_id
            ):
                return None
            new = vm.model_copy(
                update={
                    "active_model_id": vm.target_model_id,
                    "target_load_failed": False,
                    "updated_at": tx.now,
                }
            )
            deleted = tx.move_references(vm, new)
            tx.vmodel_write = new
            return deleted

        deleted = self._transact(body)
        if deleted is None:
            return False
        log.info(
            "vmodel %s completed its transition from %s to %s%s", seen.vmodel_id, seen.active_model_id,
            seen.target_model_id, f"; auto-deleted {deleted}" if deleted else "",
        )  # fmt: skip
        if deleted:
            self.drain_all()
        return True

    def _set_failed(self, seen: VModelRecord, failed: bool) -> None:
        def body(tx: _Tx) -> None:
            vm = tx.vmodel(seen.vmodel_id)
            if (
                vm is None
                or vm.active_model_id != seen.active_model_id
                or vm.target_model_id != seen.target_model_id
                or vm.target_load_failed == failed
            ):
                return
            tx.vmodel_write = vm.model_copy(update={"target_load_failed": failed, "updated_at": tx.now})

        self._transact(body)

    def advance_all(self) -> list[str]:
        """One scheduler tick: drive every pending transition and the drains of auto-deleted
        models. Returns the vmodels whose transition completed."""
        workers = self.store.live_workers()
        completed = []
        for raw in sorted(self.r.hkeys(self.keys.transitions)):
            vmodel_id = raw.decode()
            try:
                decision = self.advance(vmodel_id, workers)
            except Exception:  # one broken vmodel must not stop the others
                log.exception("advancing vmodel %s failed", vmodel_id)
                continue
            if decision is not None and decision.action is Action.SWITCH:
                completed.append(vmodel_id)
        self.drain_all(workers)
        return completed

    def advance_for_model(self, model_id: str) -> list[str]:
        """A copy of `model_id` was just loaded: drive the transitions waiting for it."""
        waiting = [
            v.decode() for v, t in self.r.hgetall(self.keys.transitions).items() if t.decode() == model_id
        ]
        completed = []
        for vmodel_id in sorted(waiting):
            decision = self.advance(vmodel_id)
            if decision is not None and decision.action is Action.SWITCH:
                completed.append(vmodel_id)
        return completed

    # ================================================================== loading

    def ensure_copies(self, model_id: str, count: int) -> list[str]:
        """Start loads until `model_id` has `count` live copies (or loads on their way); returns
        the workers told to load. The first copy goes through the cold path's claim, so a
        producer's cold load and this one never both happen."""
        return self._place(model_id, count, self._view(model_id), total=True)

    def _place(self, model_id: str, count: int, view: ModelView, *, total: bool = False) -> list[str]:
        if not view.registered or count <= 0:
            return []
        if total:
            count -= len(view.holders) + (1 if view.load_claimed and not view.holders else 0)
        placed: list[str] = []
        exclude = set(view.holders)
        if count > 0 and not view.has_copy:
            count -= 1
            if self.store.route(model_id, claimant=self.name) is Route.CLAIMED:
                self._place_one(model_id, exclude, placed)
        for _ in range(count):
            if not self._place_one(model_id, exclude, placed):
                break
        return placed

    def _place_one(self, model_id: str, exclude: set[str], placed: list[str]) -> bool:
        placement = self.store.place_load(model_id, exclude=exclude)
        if placement.worker is None:
            return False
        send_command(self.app, self.keys, placement.worker, Command(op="load", model_id=model_id))
        exclude.add(placement.worker)
        placed.append(placement.worker)
        log.info("loading a copy of %s on %s", model_id, placement.worker)
        return True

    def _view(self, model_id: str) -> ModelView:
        return ModelView.from_status(self.store.model_status(model_id))

    def _eligible_workers(self, workers: Iterable[WorkerState] | None = None) -> frozenset[str]:
        if workers is None:
            workers = self.store.live_workers()
        return frozenset(w.name for w in workers if not w.shutting_down)

    # ================================================================== draining

    def drain_all(self, workers: list[WorkerState] | None = None) -> list[str]:
        """Unload the copies of auto-deleted models whose routed requests are all answered
        (cutover.drain_decision); returns the models unloaded."""
        entries = self.r.hgetall(self.keys.draining)
        if not entries:
            return []
        beats = {w.name: w for w in (workers if workers is not None else self.store.live_workers())}
        done = []
        for model_id, raw in entries.items():
            try:
                if self._drain_one(raw, beats):
                    done.append(model_id.decode())
            except Exception:
                log.exception("draining %s failed", model_id)
        return done

    def _drain_one(self, raw: bytes, beats: dict[str, WorkerState]) -> bool:
        entry = DrainEntry.model_validate_json(raw)
        model_id = entry.model_id
        steps = list(self.app.conf.broker_transport_options.get("priority_steps", [0]))
        now = time.time()
        holders = {w: _holder_report(beats.get(w), model_id) for w in entry.holders}
        action = drain_decision(
            since=entry.since,
            drained_at=entry.drained_at,
            now=now,
            queue_depth=self.store.queue_depth(model_id, steps),
            holders=holders,
            grace_s=self.drain_grace_s,
            max_s=self.drain_max_s,
        )
        if action is DrainAction.WAIT:
            return False
        if action in (DrainAction.MARK_DRAINED, DrainAction.RESET):
            new = entry.model_copy(update={"drained_at": now if action is DrainAction.MARK_DRAINED else None})
            self._cas_hash(keys=[self.keys.draining], args=[model_id, raw, new.model_dump_json()])
            return False
        if not self._cas_hash(keys=[self.keys.draining], args=[model_id, raw, ""]):
            return False  # auto-deleted again meanwhile: the new entry decides
        current = self.store.get_record(model_id)
        if current is None:
            self._reroute(model_id, steps)
            # a producer that routed here just before the switch re-declared the queue's
            # bindings when it published (the soak found them left behind): they go now
            queue = self.keys.model_queue(model_id)
            self.r.delete(*self.keys.queue_bindings(queue), self.keys.queue_bell(queue))
            told = unload_unregistered(
                self.app, self.store, model_id, entry.holders,
                reason=f"model {model_id!r} was auto-deleted (no vmodel references it)",
            )  # fmt: skip
        else:
            # registered again meanwhile: copies of the same model that the new record lists
            # stay; the others retire gracefully (their queued requests go to the new copies)
            same = current.info.same_model(entry.info)
            serving = {w.decode() for w in self.r.hkeys(self.keys.copies(model_id))} if same else set()
            told = unload_unregistered(
                self.app, self.store, model_id, [w for w in entry.holders if w not in serving],
                fail_queued=False, reason=f"model {model_id!r} was replaced",
            )  # fmt: skip
        log.info("unloading auto-deleted %s from %s", model_id, told or "no live worker")
        return True

    def _reroute(self, model_id: str, steps: list[int]) -> None:
        """Requests still queued for an auto-deleted model that came through a vmodel go to
        that vmodel's active model instead of failing NOT_FOUND (ModelMesh §1.5's retry on a
        just-switched active, for queued requests). They are there when the model had no copy
        at the switch (evicted, or never loaded): nothing would ever answer them otherwise."""
        active: dict[str, str | None] = {}

        def destination(message: dict) -> str | None:
            vmodel_id = (message.get("headers") or {}).get("mm-vmodel-id")
            if not isinstance(vmodel_id, str):
                return None
            if vmodel_id not in active:
                try:
                    rec = self.get(vmodel_id)
                except MeshError:
                    rec = None
                active[vmodel_id] = None if rec is None else next(
                    (m for m in (rec.active_model_id, rec.target_model_id) if m != model_id), None
                )
            return active[vmodel_id]

        moved = self.store.reroute_queued(model_id, steps, destination)
        for target, count in moved.items():
            self.ensure_copies(target, 1)  # a cold target gets its load claimed, as by a producer
            log.info("moved %d queued request(s) of auto-deleted %s to %s", count, model_id, target)


def _holder_report(beat: WorkerState | None, model_id: str) -> HolderReport | None:
    if beat is None:
        return None
    pending = sum(m.buffered + m.inflight for m in beat.models if m.model_id == model_id)
    return HolderReport(updated_at=beat.updated_at, pending=pending)


# ---------------------------------------------------------------------- entry points


def advance_all(store: StateStore, app: Celery) -> list[str]:
    """The beat scheduler's vmodel duty (mesh.rebalance): drive every pending transition and
    unload drained auto-deleted models. Returns the vmodels whose transition completed."""
    return VModelManager(app, store).advance_all()


def advance_for_model(store: StateStore, app: Celery, model_id: str) -> list[str]:
    """A worker just loaded a copy of `model_id`: complete the transitions that waited for it."""
    return VModelManager(app, store).advance_for_model(model_id)
