"""What both gateway protocols do, over one MeshClient: infer, readiness, metadata.

Inference goes through `MeshClient.infer_async`: the enqueue runs on the event loop's thread
(a route that reads Redis on the client's route thread) and the wait costs no thread
(mesh/broker/replies.py), so one gateway process keeps thousands of requests in flight.
Readiness and metadata read Redis with blocking calls and run in the default executor, off
the loop.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from cachetools import TTLCache

from mesh.client import MeshClient
from mesh.errors import DeadlineExceeded, FailedPrecondition, ModelNotFound
from mesh.gateway.targets import Target
from mesh.models import ModelState

SERVER_NAME = "mesh"
# KServe V2 extensions this server implements (Triton's names); `binary_tensor_data` is the REST one
EXTENSIONS = ["binary_tensor_data"]
# How long whether a bare name is a vmodel or a model is remembered: a request by name then
# costs no extra Redis read. A vmodel created or deleted under a name that is also a model's
# is seen within this (the router caches model configs as long, CONFIG_TTL_S).
KIND_TTL_S = 2.0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mesh")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "0.1.0"


@dataclass(frozen=True)
class ModelMeta:
    name: str
    versions: list[str]
    platform: str
    inputs: list[dict]
    outputs: list[dict]


# MESH_GATEWAY_REQUEST_TIMEOUT_S's default: how long a request that brings no deadline waits
DEFAULT_DEADLINE_S = 60.0


class Frontend:
    def __init__(self, client: MeshClient, default_deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.client = client
        self.default_deadline_s = default_deadline_s
        self.version = _version()
        self._kinds: TTLCache = TTLCache(maxsize=100_000, ttl=KIND_TTL_S)
        self._kinds_lock = threading.Lock()  # the executor's threads read it too

    # ------------------------------------------------------------------ inference
    def _ids(self, target: Target) -> tuple[str | None, str | None]:
        """(model_id, vmodel_id) for MeshClient: a bare name is a vmodel if one exists."""
        name = target.name
        if name is None:
            return target.model_id, target.vmodel_id
        with self._kinds_lock:
            is_vmodel = self._kinds.get(name)
        if is_vmodel is None:
            is_vmodel = self.client.vmodels.get(name) is not None
            with self._kinds_lock:
                self._kinds[name] = is_vmodel
        return (None, name) if is_vmodel else (name, None)

    async def infer(
        self, target: Target, tensors: list[dict], deadline_s: float | None, outputs: list[str] | None = None
    ) -> dict:
        """The V2 response of one request. `deadline_s`: seconds the caller still waits; the
        request is sent with that expiry (never run after it) and the wait is bounded by it.
        None (the caller set no deadline): the gateway's default deadline bounds the wait, and
        the request's expiry is the model's `default_timeout_ms` if shorter, else that default.
        `outputs`: the output names the request asked for (None: the model's default).
        Cancelling this (a client gone) leaves nothing behind: `infer_async` discards the
        request's handle from the reply listener."""
        model_id, vmodel_id = self._ids(target)
        extra = {"outputs": outputs} if outputs else {}
        if deadline_s is not None:
            if deadline_s <= 0:
                raise DeadlineExceeded("the caller's deadline had passed when the request arrived")
            wait_s, whose = deadline_s, "the caller's deadline"
            extra["timeout_ms"] = deadline_s * 1000.0
        else:
            wait_s = self.default_deadline_s
            whose = (f"the gateway's default deadline of {wait_s:g} s (MESH_GATEWAY_REQUEST_TIMEOUT_S; a "
                     "request sets its own with a gRPC deadline or the `timeout` parameter)")  # fmt: skip
            extra["max_timeout_ms"] = wait_s * 1000.0
        call = self.client.infer_async(model_id, vmodel_id=vmodel_id, inputs=tensors, **extra)
        try:
            return await asyncio.wait_for(call, wait_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no answer from {target.shown!r} within {whose}") from None

    # ------------------------------------------------------------------ health and metadata
    def _server_ready(self) -> bool:
        """Redis answers and at least one worker is alive (else requests would only queue)."""
        try:
            return bool(self.client.list_workers())
        except Exception:
            return False

    async def server_ready(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self._server_ready)

    def _concrete(self, target: Target) -> str:
        model_id, vmodel_id = self._ids(target)
        if vmodel_id is not None:
            rec = self.client.vmodels.get(vmodel_id)
            if rec is None:
                raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
            return rec.active_model_id
        assert model_id is not None
        return model_id

    def _model_ready(self, target: Target) -> bool:
        status = self.client.get_model_status(self._concrete(target))
        if status.state is ModelState.NOT_FOUND:
            raise ModelNotFound(f"model {target.shown!r} not found")
        return status.state is ModelState.LOADED

    async def model_ready(self, target: Target) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self._model_ready, target)

    def _model_metadata(self, target: Target) -> ModelMeta:
        # the signature a worker measured at the model's first load
        model_id, vmodel_id = self._ids(target)
        try:
            meta = self.client.get_model_metadata(model_id, vmodel_id=vmodel_id)
        except FailedPrecondition:  # never loaded yet: what the record says, no tensors
            pass
        else:
            def tensors(ts: list) -> list[dict]:
                return [{"name": t.name, "datatype": t.datatype or "", "shape": list(t.shape)} for t in ts]

            return ModelMeta(target.shown, list(meta.versions), meta.platform, tensors(meta.inputs),
                             tensors(meta.outputs))  # fmt: skip
        concrete = self._concrete(target)
        record = self.client.store.get_record(concrete)
        if record is None:
            raise ModelNotFound(f"model {target.shown!r} not found")
        # a repository model `<name>@<version>` has that version; others have none
        version = concrete.rsplit("@", 1)[1] if "@" in concrete else ""
        # without a signature (a MeshClient that does not record them, or a model never
        # loaded): name, platform and version only (docs/gateway.md, "Model metadata")
        return ModelMeta(target.shown, [version] if version else [], record.info.runtime, [], [])

    async def model_metadata(self, target: Target) -> ModelMeta:
        return await asyncio.get_running_loop().run_in_executor(None, self._model_metadata, target)

