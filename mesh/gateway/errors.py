"""Mesh's typed errors as gRPC status codes and HTTP statuses.

The codes are ModelMesh's (kserve/modelmesh ModelMeshApi.java): NOT_FOUND, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED for a full queue, DEADLINE_EXCEEDED once the caller's deadline has passed
(an expired request is revoked, never run), UNAVAILABLE when Redis does not answer, INTERNAL
for a load failure or a model that raised. HTTP statuses follow KServe V2 REST (400 for a bad
request, 404 for an unknown model) and the usual meaning of the rest.
"""

from __future__ import annotations

import asyncio

import grpc
import redis
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError

from mesh.errors import MeshError

_GRPC = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "ABORTED": grpc.StatusCode.ABORTED,
    "LOADING_FAILED": grpc.StatusCode.INTERNAL,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an exception raised while serving a request."""
    if isinstance(exc, MeshError):
        return _GRPC.get(exc.code, grpc.StatusCode.UNKNOWN), str(exc) or type(exc).__name__
    if isinstance(exc, TaskRevokedError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it ran"
    if isinstance(exc, (asyncio.TimeoutError, CeleryTimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for the answer"
    if isinstance(exc, redis.RedisError):
        return grpc.StatusCode.UNAVAILABLE, f"the mesh's Redis is unavailable: {type(exc).__name__}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP.get(code, 500)
