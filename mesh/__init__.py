"""Mesh: a multi-model inference worker pool on Celery and Redis."""

from .client import MeshClient
from .config import EffectiveConfig
from .errors import (
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
    RequestTooLarge,
)
from .models import BatchingConfig, ModelInfo, ModelState, ModelStatus, WorkerState

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
    "ModelLoadFailed",
    "InferenceError",
]
