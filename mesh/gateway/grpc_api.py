"""The gRPC port: KServe V2's `inference.GRPCInferenceService` and ModelMesh's `mmesh.ModelMesh`.

One `grpc.aio` server; handlers are coroutines on its event loop. The message classes come
from the committed protos (mesh/gateway/protos), so the services are wire-compatible with
KServe's and ModelMesh's clients (tritonclient, grpcurl, ModelMesh's generated stubs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from mesh.gateway import codec
from mesh.gateway.errors import status_of
from mesh.gateway.frontend import EXTENSIONS, SERVER_NAME, Frontend
from mesh.gateway.management import Management
from mesh.gateway.protos import DESCRIPTORS, MM_SERVICE, V2_SERVICE, methods, v2
from mesh.gateway.targets import Target, pick

log = logging.getLogger("mesh.gateway.grpc")

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, what: str) -> None:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.warning("%s failed: %s", what, message)
    await context.abort(code, message)


def _deadline(context: grpc.aio.ServicerContext, request: Any) -> float | None:
    """Seconds the caller still waits: its gRPC deadline, or Triton's `timeout` parameter if
    shorter; None: neither was given (the gateway's default deadline applies)."""
    remaining = context.time_remaining()
    param = codec.grpc_timeout(request)
    if remaining is None or (param is not None and param < remaining):
        return param
    return remaining


class InferenceService:
    """KServe V2 gRPC (kserve/kserve docs/predict-api/v2/grpc_predict_v2.proto)."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerReadyResponse(ready=await self.frontend.server_ready())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=self.frontend.version, extensions=EXTENSIONS)

    def _target(self, name: str, version: str, context: grpc.aio.ServicerContext) -> Target:
        return pick(name, version, context.invocation_metadata() or ())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ready = await self.frontend.model_ready(self._target(request.name, request.version, context))
        except Exception as exc:
            await _abort(context, exc, "ModelReady")
        return v2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            meta = await self.frontend.model_metadata(self._target(request.name, request.version, context))
        except Exception as exc:
            await _abort(context, exc, "ModelMetadata")
        out = v2.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
        for kind, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs)):
            for t in tensors:
                getattr(out, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return out

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            target = self._target(request.model_name, request.model_version, context)
            tensors = codec.grpc_inputs(request)
            asked = [o.name for o in request.outputs]
            result = await self.frontend.infer(target, tensors, _deadline(context, request), asked or None)
            outputs = codec.requested(asked, result.get("outputs") or [])
            response = v2.ModelInferResponse(id=request.id, model_version=request.model_version)
            return codec.fill_grpc_response(response, result, outputs, raw=bool(request.raw_input_contents))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc, "ModelInfer")


class ManagementService:
    """ModelMesh's management API (kserve/modelmesh src/main/proto/current/model-mesh.proto)."""

    def __init__(self, management: Management) -> None:
        self.management = management

    def handler(self, name: str) -> Handler:
        call = getattr(self.management, name)

        async def rpc(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    None, call, request, context.time_remaining()
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await _abort(context, exc, name)

        return rpc


def _generic(service: str, impl: Callable[[str], Handler]) -> grpc.GenericRpcHandler:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            impl(name), request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
        for name, (req, resp) in methods(service).items()
    }
    return grpc.method_handlers_generic_handler(service, handlers)


def _enable_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """gRPC server reflection (grpc/grpc doc/server-reflection.md), as Triton serves it: tools
    such as grpcurl list and describe the services without their .proto files. The
    descriptors are the gateway's own (mesh/gateway/protos), in a pool of their own that also
    holds the reflection service's, so every name `list` shows can be described."""
    try:
        from grpc_reflection.v1alpha import reflection, reflection_pb2
    except ImportError:
        log.warning("gRPC reflection is off: the grpcio-reflection package is not installed "
                    "(install it, or set MESH_GATEWAY_REFLECTION=false to silence this)")  # fmt: skip
        return
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file:
        pool.Add(f)
    pool.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server, pool=pool)


def build_server(frontend: Frontend, management: Management | None, max_message_bytes: int, *,
                 reflection: bool = True) -> grpc.aio.Server:  # fmt: skip
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    inference = InferenceService(frontend)
    server.add_generic_rpc_handlers((_generic(V2_SERVICE, lambda name: getattr(inference, name)),))
    services = [V2_SERVICE]
    if management is not None:
        mgmt = ManagementService(management)
        server.add_generic_rpc_handlers((_generic(MM_SERVICE, mgmt.handler),))
        services.append(MM_SERVICE)
    if reflection:
        _enable_reflection(server, services)
    return server

