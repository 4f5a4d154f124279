"""The model repository's own state in Redis: the records it registers or adopts (with their
manifests) and the lock that keeps repository syncs one at a time (mesh/control/repository.py)."""

from __future__ import annotations

import uuid

import redis

from mesh.errors import FailedPrecondition
from mesh.models import ModelInfo, ModelManifest, ModelRecord
from mesh.policy.repository import same_location
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.store.changes import log_changes
from mesh.store.state import StateStore


class RepositoryStore:
    """The repository's records and sync lock for one mesh (one key prefix)."""

    def __init__(self, state: StateStore) -> None:
        self.r: redis.Redis = state.r
        self.keys: Keys = state.keys
        self.state = state

    def upsert(self, model_id: str, info: ModelInfo, manifest: ModelManifest) -> bool:
        """Register a version with its manifest, or attach/refresh the manifest of its record, in
        one WATCH/MULTI step. An existing record keeps its ModelInfo (an API registration's
        values win over the manifest); one at another location is FAILED_PRECONDITION. Returns
        whether anything changed."""
        key = self.keys.models
        validate_id(model_id)
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    raw = p.hget(key, model_id)
                    if raw is None:
                        rec = ModelRecord(model_id=model_id, info=info, manifest=manifest)
                    else:
                        rec = ModelRecord.model_validate_json(raw)
                        if not same_location(rec.info, info):
                            raise FailedPrecondition(
                                f"model {model_id!r} is registered with another location"
                            )
                        if rec.manifest == manifest:
                            p.reset()
                            return False
                        rec.manifest = manifest
                    p.multi()
                    p.hset(key, model_id, rec.model_dump_json())
                    log_changes(p, self.keys.changes, [model_id])
                    p.execute()
                    return True
                except redis.WatchError:
                    continue

    def acquire_sync_lock(self, ttl_s: float) -> str | None:
        """Take the sync lock for `ttl_s` seconds; its token, or None while another sync holds it."""
        token = uuid.uuid4().hex
        if not self.r.set(self.keys.repository_lock, token, nx=True, px=int(ttl_s * 1000)):
            return None
        return token

    def release_sync_lock(self, token: str) -> None:
        """Release the sync lock if `token` still holds it."""
        self.state.release_lock(self.keys.repository_lock, token)


__all__ = ["RepositoryStore"]
