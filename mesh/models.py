"""The data model: everything that crosses a process boundary is one of these pydantic models.

Records are stored in Redis as JSON (`model_dump_json`) and read back with `model_validate_json`;
there is no pickle anywhere.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .ids import validate_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(_Strict):
    """Per-model dynamic batching policy (Triton's `dynamic_batching` names).

    A field left as None is "not set at this level": the effective value comes from the next
    level of precedence (model manifest, then global settings, then defaults).
    """

    max_batch_size: int | None = Field(default=None, ge=1, le=65536)
    max_batch_delay_ms: float | None = Field(default=None, ge=0, le=60_000)


RUNTIME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class ModelInfo(_Strict):
    """What `register_model` needs: ModelMesh's ModelInfo (type, path) plus Mesh's per-model policy."""

    runtime: str = Field(pattern=RUNTIME_PATTERN, description="sklearn | onnx | python | ...")
    uri: str = Field(min_length=1, max_length=4096, description="file:///... (s3://... later)")
    batching: BatchingConfig | None = None
    python_class: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        description="for runtime 'python': 'package.module:ClassName'",
    )
    size_bytes: int | None = Field(
        default=None, ge=0, description="size hint used for placement before the first load"
    )
    # Copy bounds for the scheduler (docs/scheduler.md). None: not set at this level.
    min_copies: int | None = Field(
        default=None, ge=0, le=1024, description="copies kept loaded at all times (pinning)"
    )
    max_copies: int | None = Field(
        default=None, ge=1, le=1024, description="upper bound on copies from load scaling"
    )

    @model_validator(mode="after")
    def _copies_bounds(self) -> ModelInfo:
        if self.min_copies is not None and self.max_copies is not None and self.min_copies > self.max_copies:
            raise ValueError(f"min_copies ({self.min_copies}) > max_copies ({self.max_copies})")
        return self

    def same_model(self, other: ModelInfo) -> bool:
        """ModelMesh treats type/path as immutable: identical info means the same model."""
        return self.model_dump(mode="json") == other.model_dump(mode="json")


class ModelRecord(_Strict):
    """The registry entry of a concrete model (ModelMesh's ModelRecord)."""

    model_id: str
    info: ModelInfo
    refs: int = 0
    auto_delete: bool = False
    created_at: float = Field(default_factory=time.time)
    size_bytes: int | None = None  # measured at the last successful load

    @field_validator("model_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return validate_id(v)


class VModelRecord(_Strict):
    """A vmodel (alias): ModelMesh's VModelRecord (owner, active, target, target load failed)."""

    vmodel_id: str
    owner: str = ""
    active_model_id: str
    target_model_id: str
    target_load_failed: bool = False

    @property
    def in_transition(self) -> bool:
        return self.active_model_id != self.target_model_id


class ModelState(str, Enum):
    NOT_FOUND = "NOT_FOUND"
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    LOADING_FAILED = "LOADING_FAILED"

    @property
    def serving_state(self) -> str:
        """ModelMesh Serving's words for the same state."""
        return {
            "NOT_FOUND": "Pending",
            "NOT_LOADED": "Standby",
            "LOADING": "Loading",
            "LOADED": "Loaded",
            "LOADING_FAILED": "FailedToLoad",
        }[self.value]


class CopyState(str, Enum):
    LOADING = "LOADING"
    LOADED = "LOADED"


class CopyInfo(_Strict):
    worker: str
    state: CopyState
    since: float


class FailedCopy(_Strict):
    worker: str
    error: str
    time: float


class ModelStatus(_Strict):
    model_id: str
    state: ModelState
    copies: list[CopyInfo] = []
    failed_copies: list[FailedCopy] = []
    errors: list[str] = []  # newest first

    @property
    def serving_state(self) -> str:
        return self.state.serving_state


class LoadedModel(_Strict):
    model_id: str
    size_bytes: int
    last_used: float
    loaded_at: float
    inflight: int = 0
    buffered: int = 0
    requests_total: int = 0  # answered by this copy since the worker started
    request_rate: float = 0.0  # requests/s over the last heartbeat interval


class WorkerState(_Strict):
    """A worker's heartbeat, written to Redis with a TTL every `heartbeat_interval_s`."""

    name: str
    host: str
    pid: int
    capacity_bytes: int
    used_bytes: int
    models: list[LoadedModel] = []
    loading: list[str] = []
    shutting_down: bool = False
    started_at: float
    updated_at: float
    requests_total: int = 0
    batches_total: int = 0
    failures_total: int = 0
    request_rate: float = 0.0  # requests/s over the last heartbeat interval

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def mean_batch_size(self) -> float:
        return self.requests_total / self.batches_total if self.batches_total else 0.0


class Command(_Strict):
    """A command sent to one worker's private queue."""

    op: Literal["load", "unload"]
    model_id: str
    # For "unload": why, and whether requests still queued for the model must fail
    # (the model was unregistered) rather than wait for another copy.
    reason: str = ""
    fail_queued: bool = False

    @field_validator("model_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return validate_id(v)
