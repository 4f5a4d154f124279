"""VModels: aliases with a zero-downtime cutover (ModelMesh's VModelManager: kserve/modelmesh
src/main/java/com/ibm/watson/modelmesh/VModelManager.java and docs/vmodels.md there; ours:
docs/vmodels.md): the transition driver.

`VModelManager` orchestrates `set_vmodel` / `delete_vmodel` over the records of
mesh/store/vmodels.py (one Redis transaction per change, reference counts, auto-deletion) and
drives pending transitions. `advance(vmodel_id)` loads the target to as many copies as the active
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
from collections.abc import Iterable

from celery import Celery

from mesh.control.commands import send_command, unload_unregistered
from mesh.errors import DeadlineExceeded, MeshError
from mesh.models import (
    Command,
    CopyState,
    ModelInfo,
    ModelState,
    VModelRecord,
    VModelState,
    VModelStatus,
    WorkerState,
)
from mesh.policy.cutover import (
    Action,
    Decision,
    DrainAction,
    HolderReport,
    ModelView,
    copies_after_set,
    decide,
    drain_decision,
)
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.store.state import Route, StateStore
from mesh.store.vmodels import DrainEntry, SetOutcome, VModelStore

log = logging.getLogger("mesh.control.vmodels")

SYNC_TIMEOUT_S = 240.0  # ModelMesh's hard-coded 4 minutes for a sync set_vmodel
DRAIN_GRACE_S = 1.0  # a producer that resolved the old active just before the switch
DRAIN_MAX_S = 60.0  # copies of an auto-deleted model go at the latest after this
MAX_RERUNS = 8


class VModelManager:
    """The vmodel API and transition driver for one mesh (one key prefix): the records are
    `vstore`'s, the copies `store`'s, the load/unload commands go through `app`.

    Cheap to construct; safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        app: Celery,
        store: StateStore,
        *,
        vstore: VModelStore | None = None,
        drain_grace_s: float = DRAIN_GRACE_S,
        drain_max_s: float = DRAIN_MAX_S,
    ) -> None:
        self.app = app
        self.store = store
        self.vstore = vstore if vstore is not None else VModelStore(store)
        self.keys: Keys = store.keys
        self.drain_grace_s = drain_grace_s
        self.drain_max_s = drain_max_s
        self.name = f"vmodels:{socket.gethostname()}:{os.getpid()}"

    # ================================================================== records

    def get(self, vmodel_id: str) -> VModelRecord | None:
        return self.vstore.get(vmodel_id)

    def list(self) -> list[VModelRecord]:
        return self.vstore.list()

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
        """The record change of `setVModel` (VModelStore.set, one transaction; no waiting),
        then the drains it made possible."""
        outcome = self.vstore.set(
            vmodel_id,
            target_model_id,
            model_info=model_info,
            auto_delete_target_model=auto_delete_target_model,
            update_only=update_only,
            force=force,
            expected_target_model_id=expected_target_model_id,
            owner=owner,
        )
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
        deleted = self.vstore.delete(vmodel_id, owner)
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
            # the active may have just been switched (and auto-deleted): read once more
            # (as VModelManager.java's getVModelStatus does)
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
        token = uuid.uuid4().hex
        # serialised per vmodel so two drivers (beat, a worker's hook, a sync caller) never
        # place the same missing copy twice
        if not self.vstore.try_lock(vmodel_id, token):
            return None
        decision = None
        held = True
        try:
            for attempt in range(MAX_RERUNS):
                decision = self._advance_once(vmodel_id, workers if attempt == 0 else None)
                if not self.vstore.release_lock(vmodel_id, token):
                    held = False
                    break
        finally:
            if held:  # an exception, or too many reruns: let the next driver in
                self.vstore.drop_lock(vmodel_id, token)
        return decision

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
            self.vstore.set_failed(rec, False)
        if decision.action is Action.LOAD:
            self._place(rec.target_model_id, decision.copies, target)
        elif decision.action is Action.BLOCKED:
            self.vstore.set_failed(rec, True)
            log.warning("vmodel %s blocked: %s", vmodel_id, decision.reason)
        return decision

    def _complete(self, seen: VModelRecord) -> bool:
        """Switch active := target, if the vmodel still is what the decision saw."""
        deleted = self.vstore.complete(seen)
        if deleted is None:
            return False
        log.info(
            "vmodel %s completed its transition from %s to %s%s", seen.vmodel_id, seen.active_model_id,
            seen.target_model_id, f"; auto-deleted {deleted}" if deleted else "",
        )  # fmt: skip
        if deleted:
            self.drain_all()
        return True

    def advance_all(self) -> list[str]:
        """One scheduler tick: drive every pending transition and the drains of auto-deleted
        models. Returns the vmodels whose transition completed."""
        workers = self.store.live_workers()
        completed = []
        for vmodel_id in self.vstore.pending_transitions():
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
        completed = []
        for vmodel_id in self.vstore.transitions_waiting_for(model_id):
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
        send_command(self.store, placement.worker, Command(op="load", model_id=model_id))
        exclude.add(placement.worker)
        placed.append(placement.worker)
        log.info("loading a copy of %s on %s", model_id, placement.worker)
        return True

    def _view(self, model_id: str) -> ModelView:
        return self.vstore.view(model_id)

    def _eligible_workers(self, workers: Iterable[WorkerState] | None = None) -> frozenset[str]:
        return self.vstore.eligible_workers(workers)

    # ================================================================== draining

    def drain_all(self, workers: list[WorkerState] | None = None) -> list[str]:
        """Unload the copies of auto-deleted models whose routed requests are all answered
        (cutover.drain_decision); returns the models unloaded."""
        entries = self.vstore.drain_entries()
        if not entries:
            return []
        beats = {w.name: w for w in (workers if workers is not None else self.store.live_workers())}
        done = []
        for model_id, raw in entries.items():
            try:
                if self._drain_one(raw, beats):
                    done.append(model_id)
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
            self.vstore.replace_drain_entry(model_id, raw, new)
            return False
        if not self.vstore.replace_drain_entry(model_id, raw, None):
            return False  # auto-deleted again meanwhile: the new entry decides
        current = self.store.get_record(model_id)
        if current is None:
            self._reroute(model_id, steps)
            self.vstore.drop_queue_leftovers(model_id)
            told = unload_unregistered(
                self.app, self.store, model_id, entry.holders,
                reason=f"model {model_id!r} was auto-deleted (no vmodel references it)",
                generation=entry.created_at,
            )  # fmt: skip
        else:
            # registered again meanwhile: copies of the same model that the new record lists
            # stay; the others retire gracefully (their queued requests go to the new copies)
            same = current.info.same_model(entry.info)
            serving = self.vstore.copy_holders(model_id) if same else set()
            told = unload_unregistered(
                self.app, self.store, model_id, [w for w in entry.holders if w not in serving],
                fail_queued=False, reason=f"model {model_id!r} was replaced",
                generation=entry.created_at,
            )  # fmt: skip
        log.info("unloading auto-deleted %s from %s", model_id, told or "no live worker")
        return True

    def reroute_to_active(self, model_id: str, steps: list[int]) -> None:
        """`_reroute` for a model that is not registered (any more): the stray sweep's first
        step, for requests put back in its queue after the drain ran (a worker that was
        loading it, a dead holder's, a producer that saw it serving a moment before)."""
        if self.store.get_record(model_id) is None:
            self._reroute(model_id, steps)

    def _reroute(self, model_id: str, steps: list[int]) -> None:
        """Requests still queued for an auto-deleted model that came through a vmodel go to
        that vmodel's active model instead of failing NOT_FOUND (ModelMesh's retry on a
        just-switched active, ModelMeshApi.java `callModel`, for queued requests). They are
        there when the model had no copy at the switch (evicted, or never loaded): nothing would ever answer them otherwise."""
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

