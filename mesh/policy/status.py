"""Model status from the registry's raw records: ModelMesh's cluster-level ModelStatus
(`ModelStatusInfo` in kserve/modelmesh src/main/proto/current/model-mesh.proto).

Pure: the state store reads the records and the live-worker set, this decides what they mean.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.models import CopyInfo, CopyState, FailedCopy, ModelState, ModelStatus
from mesh.policy.placement import fresh_failures


def model_status(
    model_id: str,
    *,
    registered: bool,
    copies: Iterable[CopyInfo],
    failures: Iterable[FailedCopy],
    live_workers: set[str],
    load_claimed: bool,
    now: float,
    load_failure_expiry_s: float,
    unservable: str | None = None,
) -> ModelStatus:
    """NOT_FOUND | NOT_LOADED | LOADING | LOADED | LOADING_FAILED, with copies and errors.

    Copies held by workers whose heartbeat expired are not copies any more (the worker is
    dead); failure records older than the expiry no longer count as failures (ModelMesh's
    janitor forgets them too, which is what lets a failed model be retried). `unservable`: why
    no live worker may hold the model (mesh/policy/labels.py `no_match_reason`), shown as the
    status's reason while it has no live copy.
    """
    if not registered:
        return ModelStatus(model_id=model_id, state=ModelState.NOT_FOUND)
    live = sorted((c for c in copies if c.worker in live_workers), key=lambda c: -c.since)
    failed = fresh_failures(failures, now, load_failure_expiry_s)
    if any(c.state is CopyState.LOADED for c in live):
        state = ModelState.LOADED
    elif live or load_claimed:
        state = ModelState.LOADING
    elif failed:
        state = ModelState.LOADING_FAILED
    else:
        state = ModelState.NOT_LOADED
    return ModelStatus(
        model_id=model_id,
        state=state,
        copies=live,
        failed_copies=failed,
        errors=[f.error for f in failed],
        reason=(unservable or "") if not live else "",
    )
