"""The registry of one mesh as the repository sync sees it (`ModelRegistry`,
mesh/control/repository.py): reads and writes go to the store (StateStore, VModelStore,
RepositoryStore); unregistering and setting a vmodel also act on the workers (unload commands,
the vmodel cutover), which is why this lives in control and not in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from mesh.control.commands import unload_unregistered
from mesh.control.vmodels import VModelManager
from mesh.models import ModelInfo, ModelManifest, ModelRecord, VModelRecord, VModelStatus
from mesh.protocol.ids import validate_id
from mesh.settings import MeshSettings
from mesh.store.context import StoreContext
from mesh.store.repository import RepositoryStore
from mesh.store.state import StateStore

if TYPE_CHECKING:
    from mesh.control.routing import Router


class MeshRegistry:
    """`ModelRegistry` over one mesh's store; commands go through `app`.

    `vmodels` and `router` are a MeshClient's own when built from its parts, so its caches see
    what the sync changed: `MeshRegistry(client.app, client.store, vmodels=client.vmodels,
    router=client.router)`. A worker running the sync task uses `MeshRegistry.from_app(app)`.
    """

    def __init__(
        self,
        app: Celery,
        store: StateStore,
        *,
        vmodels: VModelManager | None = None,
        router: Router | None = None,
        repository: RepositoryStore | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.vmodels = vmodels if vmodels is not None else VModelManager(app, store)
        self.router = router
        self.repository = repository if repository is not None else RepositoryStore(store)

    @classmethod
    def from_app(cls, app: Celery) -> MeshRegistry:
        """The registry of the mesh a Celery app was configured for (its prefix and Redis URL;
        the rest of the settings, storage credentials included, are this process's own)."""
        return cls(app, StoreContext.from_app(app, shared=True).store)

    @property
    def settings(self) -> MeshSettings:
        return self.store.settings

    def list_models(self) -> list[ModelRecord]:
        return self.store.list_records()

    def list_vmodels(self) -> list[VModelRecord]:
        return self.vmodels.list()

    def upsert_record(self, model_id: str, info: ModelInfo, manifest: ModelManifest) -> bool:
        return self.repository.upsert(model_id, info, manifest)

    def unregister_model(self, model_id: str) -> None:
        validate_id(model_id)
        record, holders = self.store.unregister(model_id)
        if self.router is not None:
            self.router.forget(model_id)
        unload_unregistered(self.app, self.store, model_id, holders,
                            generation=record.created_at if record else None)  # fmt: skip

    def set_vmodel(
        self,
        vmodel_id: str,
        target_model_id: str,
        *,
        auto_delete_target_model: bool = False,
        expected_target_model_id: str | None = None,
        owner: str | None = None,
    ) -> VModelStatus:
        return self.vmodels.set_vmodel(
            vmodel_id,
            target_model_id,
            auto_delete_target_model=auto_delete_target_model,
            expected_target_model_id=expected_target_model_id,
            owner=owner,
        )

    def delete_vmodel(self, vmodel_id: str, owner: str | None = None) -> None:
        self.vmodels.delete(vmodel_id, owner)

    def acquire_sync_lock(self, ttl_s: float) -> str | None:
        return self.repository.acquire_sync_lock(ttl_s)

    def release_sync_lock(self, token: str) -> None:
        self.repository.release_sync_lock(token)


__all__ = ["MeshRegistry"]
