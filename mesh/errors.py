"""Typed errors, mirroring ModelMesh's gRPC status codes.

Every error the public API raises is a `MeshError` with a `code` from ModelMesh's vocabulary
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...).
Workers store failures through Celery's JSON result format (module + class name + args), so
these classes must be importable and constructible from a single message argument: a client
calling `AsyncResult.get()` then receives the same typed exception the worker raised.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error Mesh raises on purpose."""

    code = "UNKNOWN"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MeshError, ValueError):
    code = "INVALID_ARGUMENT"


class InvalidId(InvalidArgument):
    """An id does not match the allowed pattern (it would become a Redis key or queue name)."""


class InvalidInput(InvalidArgument):
    """An inference request's tensors are malformed or do not match the model's signature."""


class RequestTooLarge(InvalidArgument):
    """The encoded request is larger than MESH_MAX_REQUEST_BYTES; nothing was enqueued."""


class NotFound(MeshError, LookupError):
    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    """Unknown model or vmodel id (raised at enqueue time, or for requests of an unregistered model)."""


class AlreadyExists(MeshError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MeshError):
    code = "FAILED_PRECONDITION"


class QueueFull(MeshError):
    """The model's queue holds max_queue_size requests; nothing was enqueued (Triton's
    "Exceeds maximum queue size")."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MeshError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class PermissionDenied(MeshError):
    """An operator's rule forbids it: a model outside the storage roots, a python class from a
    module the operator did not allow (docs/security.md)."""

    code = "PERMISSION_DENIED"


class PredictTimeout(DeadlineExceeded):
    """The model's predict ran past its timeout (MESH_PREDICT_TIMEOUT_S or the model's
    `batching.predict_timeout_s`): its batch failed and the copy was taken out of service."""


class Unavailable(MeshError):
    code = "UNAVAILABLE"


class DeliveryLimitExceeded(MeshError):
    """The request was delivered MESH_MAX_DELIVERIES times and each time the worker holding it
    died or stalled: it is in the dead-letter list (`mesh dead-letters list`), not retried."""

    code = "ABORTED"


class ModelLoadFailed(MeshError):
    """The model could not be loaded; carries the runtime's error message."""

    code = "LOADING_FAILED"


class InferenceError(MeshError):
    """The runtime's predict raised for this request; carries the runtime's message."""

    code = "INTERNAL"


class ModelEvicted(MeshError):
    """Internal signal: a request reached a worker that no longer serves its model (requeued)."""

    code = "UNAVAILABLE"
