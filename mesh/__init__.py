"""Mesh: a multi-model inference worker pool on Celery and Redis."""

from mesh.client import MeshClient
from mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InferenceError,
    InvalidArgument,
    InvalidId,
    InvalidInput,
    MeshError,
    ModelLoadFailed,
    ModelNotFound,
    PredictTimeout,
    RequestTooLarge,
)
from mesh.models import BatchingConfig, ModelInfo, ModelState, ModelStatus, WorkerState
from mesh.policy.precedence import EffectiveConfig

__all__ = [
    "MeshClient",
    "ModelInfo",
    "BatchingConfig",
    "ModelState",
    "ModelStatus",
    "WorkerState",
    "EffectiveConfig",
    "MeshError",
    "InvalidArgument",
    "InvalidId",
    "InvalidInput",
    "RequestTooLarge",
    "ModelNotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "DeadlineExceeded",
    "PredictTimeout",
    "ModelLoadFailed",
    "InferenceError",
]
