"""ModelMesh's management API (`mmesh.ModelMesh`) over MeshClient.

Messages and semantics are ModelMesh's (kserve/modelmesh src/main/proto/current/
model-mesh.proto); the work is MeshClient's (docs/vmodels.md). ModelMesh's `ModelInfo
{type, path, key}` maps onto Mesh's `ModelInfo` (docs/gateway.md, "Management API"):

- `type` is the runtime. ModelMesh Serving sends placement labels such as `mt:sklearn` or
  `mt:sklearn:1`; the `mt:` prefix and a `:version` suffix are dropped (`rt:<runtime>` too).
- `key` is the storage key (an entry of MESH_STORAGE_CONFIG) and `path` the object key inside
  that storage's bucket; ModelMesh Serving passes `key` as JSON (`{"storage_key": ...,
  "storage_params": {"bucket": ...}, "model_type": {"name": ...}}`), also understood. Without
  a key, `path` is a location URI (`file:///...`, `s3://bucket/key`).

Every call blocks on Redis (and `sync` calls wait for loads), so each runs in the executor.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.client import MeshClient
from mesh.errors import InvalidArgument
from mesh.gateway.protos import mm
from mesh.models import ModelInfo, ModelState, ModelStatus, VModelState, VModelStatus

_MODEL_STATUS = mm.ModelStatusInfo.ModelStatus
_VMODEL_STATUS = mm.VModelStatusInfo.VModelStatus
DEFAULT_SYNC_TIMEOUT_S = 240.0  # ModelMesh's setVModel sync waits up to 4 minutes


def model_info(info: Any) -> ModelInfo:
    """Mesh's ModelInfo from ModelMesh's (INVALID_ARGUMENT when it cannot be one)."""
    kind, path, key = info.type.strip(), info.path, info.key.strip()
    storage_key: str | None = key or None
    bucket: str | None = None
    if key.startswith("{"):
        try:
            parsed = json.loads(key)
        except ValueError:
            raise InvalidArgument("modelInfo.key is neither a storage key nor JSON") from None
        if not isinstance(parsed, dict):
            raise InvalidArgument("modelInfo.key JSON must be an object")
        storage_key = parsed.get("storage_key") or None
        params = parsed.get("storage_params") or {}
        bucket = params.get("bucket") if isinstance(params, dict) else None
        model_type = parsed.get("model_type") or {}
        if not kind and isinstance(model_type, dict):
            kind = str(model_type.get("name") or "")
    runtime = kind
    for label in ("mt:", "rt:"):
        if runtime.startswith(label):
            runtime = runtime[len(label):]
    runtime = runtime.split(":", 1)[0].lower()
    if not runtime:
        raise InvalidArgument("modelInfo.type must name the runtime (e.g. sklearn, onnx)")
    if not path:
        raise InvalidArgument("modelInfo.path must give the model's location")
    uri = f"s3://{bucket}/{path.lstrip('/')}" if bucket else path
    try:
        return ModelInfo(runtime=runtime, uri=uri, storage_key=storage_key)
    except ValueError as exc:
        raise InvalidArgument(f"invalid modelInfo: {exc}") from None


def _millis(t: float) -> int:
    return int(t * 1000)


def model_status_info(status: ModelStatus) -> Any:
    out = mm.ModelStatusInfo(status=_MODEL_STATUS.Value(status.state.value), errors=status.errors)
    copies = [(c.since, c.worker, _MODEL_STATUS.Value(c.state.value)) for c in status.copies]
    copies += [(f.time, f.worker, _MODEL_STATUS.LOADING_FAILED) for f in status.failed_copies]
    for since, worker, state in sorted(copies, reverse=True):  # newest first, as ModelMesh
        out.modelCopyInfos.add(location=worker, copyStatus=state, time=_millis(since))
    return out


def _copies_status(state: ModelState | None, copies: list, failed: list, errors: list[str]) -> Any:
    return model_status_info(
        ModelStatus(model_id="-", state=state or ModelState.NOT_FOUND, copies=copies, failed_copies=failed,
                    errors=errors)  # fmt: skip
    )


def vmodel_status_info(status: VModelStatus) -> Any:
    out = mm.VModelStatusInfo(
        status=_VMODEL_STATUS.Value(status.status.value),
        activeModelId=status.active_model_id,
        targetModelId=status.target_model_id,
        owner=status.owner,
    )
    if status.status is VModelState.NOT_FOUND:
        out.activeModelStatus.CopyFrom(mm.ModelStatusInfo(status=_MODEL_STATUS.NOT_FOUND))
        return out
    transitioning = bool(status.target_model_id) and status.target_model_id != status.active_model_id
    out.activeModelStatus.CopyFrom(
        _copies_status(status.active_model_state, status.active_model_copies,
                       status.active_model_failed_copies, [] if transitioning else status.errors)  # fmt: skip
    )
    if transitioning:
        out.targetModelStatus.CopyFrom(
            _copies_status(status.target_model_state, status.target_model_copies,
                           status.target_model_failed_copies, status.errors)  # fmt: skip
        )
    if not out.targetModelId:
        out.targetModelId = out.activeModelId
    return out


class Management:
    """One method per RPC: request message in, response message out (blocking)."""

    def __init__(self, client: MeshClient) -> None:
        self.client = client

    def registerModel(self, req: Any, timeout_s: float | None) -> Any:
        if not req.HasField("modelInfo"):
            raise InvalidArgument("registerModel needs modelInfo")
        status = self.client.register_model(
            req.modelId, model_info(req.modelInfo), load_now=req.loadNow, sync=req.loadNow and req.sync,
            timeout=timeout_s or DEFAULT_SYNC_TIMEOUT_S,
        )  # fmt: skip
        return model_status_info(status)

    def unregisterModel(self, req: Any, timeout_s: float | None) -> Any:
        self.client.unregister_model(req.modelId)
        return mm.UnregisterModelResponse()

    def getModelStatus(self, req: Any, timeout_s: float | None) -> Any:
        return model_status_info(self.client.get_model_status(req.modelId))

    def ensureLoaded(self, req: Any, timeout_s: float | None) -> Any:
        status = self.client.ensure_loaded(req.modelId, sync=req.sync, timeout=timeout_s or DEFAULT_SYNC_TIMEOUT_S)
        return model_status_info(status)

    def setVModel(self, req: Any, timeout_s: float | None) -> Any:
        info = model_info(req.modelInfo) if req.HasField("modelInfo") else None
        status = self.client.set_vmodel(
            req.vModelId,
            req.targetModelId,
            model_info=info,
            auto_delete_target_model=req.autoDeleteTargetModel,
            update_only=req.updateOnly,
            load_now=req.loadNow,
            force=req.force,
            sync=req.sync,
            expected_target_model_id=req.expectedTargetModelId or None,
            owner=req.owner or None,
            timeout=timeout_s or DEFAULT_SYNC_TIMEOUT_S,
        )
        return vmodel_status_info(status)

    def getVModelStatus(self, req: Any, timeout_s: float | None) -> Any:
        return vmodel_status_info(self.client.get_vmodel_status(req.vModelId, owner=req.owner or None))

    def deleteVModel(self, req: Any, timeout_s: float | None) -> Any:
        self.client.delete_vmodel(req.vModelId, owner=req.owner or None)
        return mm.DeleteVModelResponse()
