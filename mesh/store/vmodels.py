"""The vmodel records in Redis: every change to a vmodel, to the reference counts of the models it
names, and the auto-deletion of a model nobody references any more (ModelMesh's kserve/modelmesh
src/main/java/com/ibm/watson/modelmesh/VModelManager.java; docs/vmodels.md).

Each change is ONE transaction: WATCH over the models and vmodels hashes (plus the copies of a
model being deleted), MULTI, EXEC, retried on conflict. A vmodel holds exactly one reference on
each distinct model it names ({active, target}); references move by set difference, which is
what keeps ModelMesh's two refcount leaks out (forced re-switch to the pending target, and
cancelling a transition, each add a second reference there).

Also here: the per-vmodel lock that serialises transition drivers, the index of pending
transitions, and the drain list of auto-deleted models. The driver that uses them is
mesh/control/vmodels.py; the decisions are mesh/policy/cutover.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from pydantic import BaseModel, ConfigDict

from mesh.errors import AlreadyExists, FailedPrecondition, MeshError, ModelNotFound, Unavailable
from mesh.models import ModelInfo, ModelRecord, VModelRecord, WorkerState
from mesh.policy.cutover import ModelView, may_switch_now
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.store.changes import log_changes
from mesh.store.state import StateStore

log = logging.getLogger("mesh.store.vmodels")

LOCK_TTL_MS = 10_000
MAX_TX_ATTEMPTS = 200

T = TypeVar("T")

# A driver that finds the lock taken marks the vmodel dirty and leaves: the holder runs once
# more before releasing, so no wake-up is lost.
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
    created_at: float | None = None  # the auto-deleted record's generation (Command.generation)
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
            model_id=rec.model_id, info=rec.info, holders=sorted(holders), since=self.now,
            created_at=rec.created_at,
        )

    def commit(self) -> None:
        """MULTI/EXEC the staged writes (none: EXEC still validates the reads)."""
        k, p = self.k, self.p
        p.multi()
        for model_id, rec in self.model_writes.items():
            p.hset(k.models, model_id, rec.model_dump_json())
        for model_id, entry in self.model_deletes.items():
            p.hdel(k.models, model_id)
            p.hdel(k.signatures, model_id)
            p.delete(k.copies(model_id), k.failures(model_id), k.load_claim(model_id),
                     *k.queue_bindings(k.model_queue(model_id)))
            p.hset(k.draining, model_id, entry.model_dump_json())
            p.zadd(k.gone, {model_id: self.now})  # its queue is watched for strays (mesh/store/strays.py)
        log_changes(p, k.changes, [*self.model_writes, *self.model_deletes])
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


class VModelStore:
    """The vmodel records of one mesh (one key prefix), over its StateStore.

    Cheap to construct; safe to use from several threads and processes at once.
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.r: redis.Redis = state.r
        self.keys: Keys = state.keys
        self._acquire = self.r.register_script(_LOCK_ACQUIRE_LUA)
        self._release = self.r.register_script(_LOCK_RELEASE_LUA)
        self._cas_hash = self.r.register_script(_CAS_HASH_LUA)

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

    # ------------------------------------------------------------------ reads

    def get(self, vmodel_id: str) -> VModelRecord | None:
        raw = self.r.hget(self.keys.vmodels, validate_id(vmodel_id, "vmodel"))
        return None if raw is None else VModelRecord.model_validate_json(raw)

    def list(self) -> list[VModelRecord]:
        raw = self.r.hgetall(self.keys.vmodels)
        return sorted((VModelRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.vmodel_id)

    def view(self, model_id: str) -> ModelView:
        return ModelView.from_status(self.state.model_status(model_id))

    def eligible_workers(self, workers: Iterable[WorkerState] | None = None) -> frozenset[str]:
        """The workers that may take a copy: live ones not shutting down."""
        if workers is None:
            workers = self.state.live_workers()
        return frozenset(w.name for w in workers if not w.shutting_down)

    def pending_transitions(self) -> list[str]:
        """Vmodels whose target differs from their active, from the index kept with each record."""
        return sorted(raw.decode() for raw in self.r.hkeys(self.keys.transitions))

    def transitions_waiting_for(self, model_id: str) -> list[str]:
        """Vmodels in transition to `model_id`."""
        return sorted(
            v.decode() for v, t in self.r.hgetall(self.keys.transitions).items() if t.decode() == model_id
        )

    # ------------------------------------------------------------------ record changes

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
        """The record change of `setVModel` (VModelManager.java `updateVModel`), one
        transaction; no waiting.

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
        workers = self.eligible_workers()

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
                if target == vm.target_model_id == vm.active_model_id:
                    return out  # steady state: nothing to write
                switch, active_view = False, None
                if target != vm.active_model_id:
                    active_view = self.view(vm.active_model_id)
                    # a target created by this call is registered once we commit, with no copy
                    target_view = self.view(target) if trec is not None else ModelView()
                    switch = may_switch_now(active_view, target_view, workers, force)
                if target == vm.target_model_id and not force and not switch:
                    return out  # already transitioning to it, not ready yet: nothing to write
                # Setting the pending target again when it is ready switches in this same step,
                # like a first set to a ready target: left to a later `advance`, a concurrent set
                # could cancel the transition in between, and this call would have returned ok
                # for a change that never happened (tests/integration/test_vmodels.py, the
                # two-client property).
                new = vm.model_copy(
                    update={"target_model_id": target, "target_load_failed": False, "updated_at": tx.now}
                )
                if active_view is not None:
                    out.previous_active_copies = len(active_view.loaded)
                    if switch:
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

        return self._transact(body)

    def delete(self, vmodel_id: str, owner: str | None = None) -> list[str]:
        """The record change of `deleteVModel`: idempotent; a vmodel of another owner is left
        alone (silently). Returns the models auto-deleted with it."""
        validate_id(vmodel_id, "vmodel")
        owner = owner or None

        def body(tx: _Tx) -> list[str]:
            vm = tx.vmodel(vmodel_id)
            if vm is None or (owner is not None and vm.owner != owner):
                return []
            deleted = tx.move_references(vm, None)
            tx.vmodel_delete = vmodel_id
            return deleted

        return self._transact(body)

    def complete(self, seen: VModelRecord) -> list[str] | None:
        """Switch active := target, if the vmodel still is what the caller's decision saw.
        Returns the models auto-deleted by the switch, None when the vmodel changed meanwhile."""

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

        return self._transact(body)

    def set_failed(self, seen: VModelRecord, failed: bool) -> None:
        """Mark (or clear) a transition as blocked by its target's failed loads, if the vmodel
        still is what the caller's decision saw."""

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

    # ------------------------------------------------------------------ the drivers' lock

    def try_lock(self, vmodel_id: str, token: str) -> bool:
        """Take the vmodel's driver lock; when it is taken, mark the vmodel dirty instead (its
        holder then runs once more) and return False."""
        return bool(self._acquire(keys=self._lock_keys(vmodel_id), args=[token, LOCK_TTL_MS]))

    def release_lock(self, vmodel_id: str, token: str) -> bool:
        """Release the lock, unless another driver marked the vmodel dirty meanwhile: then the
        lock is kept (lease renewed) and True says run once more."""
        return bool(self._release(keys=self._lock_keys(vmodel_id), args=[token, LOCK_TTL_MS]))

    def drop_lock(self, vmodel_id: str, token: str) -> None:
        """Release the lock if `token` still holds it, dirty or not (a driver giving up)."""
        key = self.keys.vmodel_lock(vmodel_id)
        with self.r.pipeline() as p:
            try:
                p.watch(key)
                if p.get(key) == token.encode():
                    p.multi()
                    p.delete(key)
                    p.execute()
            except redis.WatchError:
                pass

    def _lock_keys(self, vmodel_id: str) -> list[str]:
        return [self.keys.vmodel_lock(vmodel_id), self.keys.vmodel_dirty(vmodel_id)]

    # ------------------------------------------------------------------ draining

    def drain_entries(self) -> dict[str, bytes]:
        """The auto-deleted models still draining, as stored: each raw entry is the expected
        value of `replace_drain_entry`."""
        return {model_id.decode(): raw for model_id, raw in self.r.hgetall(self.keys.draining).items()}

    def replace_drain_entry(self, model_id: str, seen: bytes, new: DrainEntry | None) -> bool:
        """Replace (None: remove) a drain entry if it still is `seen`; False when it was
        rewritten meanwhile (the model was auto-deleted again)."""
        value = "" if new is None else new.model_dump_json()
        return bool(self._cas_hash(keys=[self.keys.draining], args=[model_id, seen, value]))

    def copy_holders(self, model_id: str) -> set[str]:
        """The workers the registry lists a copy of `model_id` on."""
        return {w.decode() for w in self.r.hkeys(self.keys.copies(model_id))}

    def drop_queue_leftovers(self, model_id: str) -> None:
        """Delete the bindings and bell of an auto-deleted model's queue: a producer that routed
        there just before the switch re-declared them when it published (the soak found them
        left behind)."""
        queue = self.keys.model_queue(model_id)
        self.r.delete(*self.keys.queue_bindings(queue), self.keys.queue_bell(queue))


__all__ = ["LOCK_TTL_MS", "MAX_TX_ATTEMPTS", "DrainEntry", "SetOutcome", "VModelStore"]
