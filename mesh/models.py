"""The data model: everything that crosses a process boundary is one of these pydantic models.

Records are stored in Redis as JSON (`model_dump_json`) and read back with `model_validate_json`;
there is no pickle anywhere.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mesh.protocol.ids import validate_id
from mesh.protocol.labels import validate_labels


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(_Strict):
    """Per-model dynamic batching policy (Triton's `dynamic_batching` names).

    A field left as None is "not set at this level": the effective value comes from the next
    level of precedence (model manifest, then global settings, then defaults).
    """

    max_batch_size: int | None = Field(
        default=None, ge=1, le=65536, description="items per batch (a request is one item)"
    )
    max_batch_delay_ms: float | None = Field(
        default=None, ge=0, le=60_000, description="longest wait of the oldest request for a fuller batch"
    )
    preferred_batch_sizes: list[int] | None = Field(
        default=None, description="batch sizes to form when more is buffered (Triton)"
    )
    max_queue_size: int | None = Field(
        default=None, ge=0, description="requests waiting in Redis beyond which new ones are rejected (0: no limit)"
    )
    default_timeout_ms: float | None = Field(
        default=None, ge=0, description="requests not started within this are never run (0: no timeout)"
    )
    default_priority: Literal["high", "normal"] | None = None
    predict_timeout_s: float | None = Field(
        default=None, ge=0, le=86_400,
        description="a predict call running longer fails its batch and takes the copy out of service (0: no watchdog)",
    )

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v or any(not isinstance(n, int) or n < 1 or n > 65536 for n in v):
            raise ValueError("preferred_batch_sizes must be a non-empty list of integers in 1..65536")
        return sorted(set(v))


RUNTIME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class ModelInfo(_Strict):
    """What `register_model` needs: ModelMesh's ModelInfo (type, path) plus Mesh's per-model policy."""

    runtime: str = Field(pattern=RUNTIME_PATTERN, description="sklearn | onnx | python | ...")
    uri: str = Field(
        min_length=1,
        max_length=4096,
        description="file:///abs/path, s3://bucket/key, or a key inside `storage_key`'s bucket",
    )
    storage_key: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
        description="entry of MESH_STORAGE_CONFIG holding the credentials (docs/storage.md)",
    )
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
    # Worker pools (docs/operations.md, "Worker pools"). None: not set at this level.
    required_labels: dict[str, str] | None = Field(
        default=None,
        description="labels a worker must carry (MESH_WORKER_LABELS) to hold this model, e.g. "
        '{"env": "sklearn-1.5"}',
    )

    @field_validator("required_labels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else validate_labels(v, "required_labels")

    @model_validator(mode="after")
    def _copies_bounds(self) -> ModelInfo:
        if self.min_copies is not None and self.max_copies is not None and self.min_copies > self.max_copies:
            raise ValueError(f"min_copies ({self.min_copies}) > max_copies ({self.max_copies})")
        return self

    def same_model(self, other: ModelInfo) -> bool:
        """ModelMesh treats type/path as immutable: identical info means the same model."""
        return self.model_dump(mode="json") == other.model_dump(mode="json")


class ModelManifest(_Strict):
    """Per-model settings from the model repository's `mesh.json` (docs/storage.md).

    The "manifest" level of the precedence: management API (`ModelInfo`) > manifest > global
    settings. `runtime`/`python_class` are fixed when a version is registered; the rest is read
    by workers at each load.
    """

    runtime: str | None = Field(default=None, pattern=RUNTIME_PATTERN)
    python_class: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
    )
    batching: BatchingConfig | None = None
    min_copies: int | None = Field(default=None, ge=0, le=1024)
    max_copies: int | None = Field(default=None, ge=1, le=1024)
    required_labels: dict[str, str] | None = None

    @field_validator("required_labels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else validate_labels(v, "required_labels")

    @model_validator(mode="after")
    def _manifest_copies_bounds(self) -> ModelManifest:
        if self.min_copies is not None and self.max_copies is not None and self.min_copies > self.max_copies:
            raise ValueError(f"min_copies ({self.min_copies}) > max_copies ({self.max_copies})")
        return self


class ModelRecord(_Strict):
    """The registry entry of a concrete model (ModelMesh's ModelRecord)."""

    model_id: str
    info: ModelInfo
    refs: int = 0
    auto_delete: bool = False
    created_at: float = Field(default_factory=time.time)
    size_bytes: int | None = None  # measured at the last successful load
    # Set by the repository sync (mesh/control/repository.py): the merged manifest of a repository
    # version. None for models registered only through the API.
    manifest: ModelManifest | None = None

    @field_validator("model_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return validate_id(v)


class VModelRecord(_Strict):
    """A vmodel (alias): ModelMesh's VModelRecord (owner, active, target, target load failed).

    Requests for the vmodel go to `active_model_id`; while `target_model_id` differs, a
    transition is pending (mesh/control/vmodels.py drives it). The vmodel holds one reference on each
    distinct model it names: that is what `ModelRecord.refs` counts.
    """

    vmodel_id: str
    owner: str = ""
    active_model_id: str
    target_model_id: str
    target_load_failed: bool = False  # meaningful only while in transition
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @field_validator("vmodel_id")
    @classmethod
    def _valid_vmodel_id(cls, v: str) -> str:
        return validate_id(v, "vmodel")

    @field_validator("active_model_id", "target_model_id")
    @classmethod
    def _valid_model_ids(cls, v: str) -> str:
        return validate_id(v)

    @property
    def in_transition(self) -> bool:
        return self.active_model_id != self.target_model_id

    @property
    def references(self) -> frozenset[str]:
        """The models this vmodel holds a reference on (one each, even when active == target)."""
        return frozenset((self.active_model_id, self.target_model_id))


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
    # Why nothing loads it, when that is not a load error: "NO_MATCHING_WORKER: needs ...; live
    # workers offer ..." (docs/operations.md, "Worker pools"). Empty otherwise.
    reason: str = ""

    @property
    def serving_state(self) -> str:
        return self.state.serving_state


class TensorMetadata(_Strict):
    """One input or output of a model's signature (KServe V2's metadata_tensor). `shape` uses -1
    for a dimension of any size (the first is the batch); `datatype` is None when the model
    accepts any (an sklearn pipeline may take text or numbers): a V2 gateway shows it as ""."""

    name: str
    datatype: str | None = None
    shape: list[int] = []


class ModelSignature(_Strict):
    """What a worker records when it loads a model (`StateStore.set_signature`): its inputs,
    the outputs a request may name, and those a request naming none gets (None: all).
    `generation` is the registration it was measured for (`ModelRecord.created_at`): an id
    unregistered and registered again with another model never shows the old signature."""

    runtime: str
    inputs: list[TensorMetadata] = []
    outputs: list[TensorMetadata] = []
    default_outputs: list[str] | None = None
    generation: float


# KServe V2's `platform` of each runtime (Triton's names where it has one)
PLATFORMS = {
    "sklearn": "sklearn",
    "onnx": "onnxruntime_onnx",
    "python": "python",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "tensorflow": "tensorflow_savedmodel",
}


class ModelMetadata(_Strict):
    """A model's metadata in KServe V2's shape (`GET /v2/models/{name}`, the ModelMetadata RPC):
    `MeshClient.get_model_metadata`. `name` is the id asked for; for a vmodel, `versions` holds
    its active concrete model. `outputs` are all the outputs a request may name (KServe V2
    `outputs`); `default_outputs` those a request naming none gets (None: all of them)."""

    name: str
    versions: list[str] = []
    platform: str
    inputs: list[TensorMetadata] = []
    outputs: list[TensorMetadata] = []
    default_outputs: list[str] | None = None


class VModelState(str, Enum):
    """ModelMesh's VModelStatus (`VModelStatusInfo` in kserve/modelmesh
    src/main/proto/current/model-mesh.proto)."""

    NOT_FOUND = "NOT_FOUND"
    DEFINED = "DEFINED"
    TRANSITIONING = "TRANSITIONING"
    TRANSITION_FAILED = "TRANSITION_FAILED"

    @property
    def transition_status(self) -> str | None:
        """ModelMesh Serving's `transitionStatus` for the same state (None: no vmodel)."""
        return {
            "NOT_FOUND": None,
            "DEFINED": "UpToDate",
            "TRANSITIONING": "InProgress",
            "TRANSITION_FAILED": "BlockedByFailedLoad",
        }[self.value]


class VModelStatus(_Strict):
    """What `get_vmodel_status` / `set_vmodel` return: ModelMesh's VModelStatusInfo, with the
    copies of both models and ModelMesh Serving's words as properties.

    `target_model_*` are set only while a transition is pending (active != target). Unlike
    ModelMesh, which always reports a transitioning target as LOADING, `target_model_state` is
    the target's real state: it can be LOADED while the transition still waits for more copies.
    """

    vmodel_id: str
    status: VModelState
    active_model_id: str = ""
    target_model_id: str = ""
    owner: str = ""
    active_model_state: ModelState | None = None
    target_model_state: ModelState | None = None
    active_model_copies: list[CopyInfo] = []
    active_model_failed_copies: list[FailedCopy] = []
    target_model_copies: list[CopyInfo] = []
    target_model_failed_copies: list[FailedCopy] = []
    errors: list[str] = []  # load errors, newest first: the target's while transitioning

    @property
    def in_transition(self) -> bool:
        return self.status in (VModelState.TRANSITIONING, VModelState.TRANSITION_FAILED)

    @property
    def transition_status(self) -> str | None:
        """UpToDate | InProgress | BlockedByFailedLoad (None when the vmodel does not exist).

        As ModelMesh Serving does, a failed transition whose target is loading again (its
        failure records expired and it is being retried) shows InProgress.
        """
        if self.status is VModelState.TRANSITION_FAILED and self.target_model_state is ModelState.LOADING:
            return "InProgress"
        return self.status.transition_status

    @property
    def active_model_serving_state(self) -> str:
        """Standby | Loading | Loaded | FailedToLoad, or Pending when there is no active model."""
        return (self.active_model_state or ModelState.NOT_FOUND).serving_state

    @property
    def target_model_serving_state(self) -> str | None:
        return self.target_model_state.serving_state if self.target_model_state else None

    @property
    def copies(self) -> int:
        """ModelMesh Serving's `totalCopies`: copies and failed copies of the active model, plus
        the target's while transitioning."""
        return (
            len(self.active_model_copies)
            + len(self.active_model_failed_copies)
            + len(self.target_model_copies)
            + len(self.target_model_failed_copies)
        )

    total_copies = copies

    @property
    def failed_copies(self) -> int:
        """ModelMesh Serving's `failedCopies`."""
        return len(self.active_model_failed_copies) + len(self.target_model_failed_copies)


class LoadedModel(_Strict):
    model_id: str
    size_bytes: int
    last_used: float
    loaded_at: float
    inflight: int = 0
    buffered: int = 0
    # how long its oldest buffered request has waited in this worker (since it arrived here:
    # time in the queue before is not counted); the exporter's age of the oldest pending request
    oldest_buffered_s: float = 0.0
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
    labels: dict[str, str] = {}  # MESH_WORKER_LABELS: the pool(s) it belongs to

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def mean_batch_size(self) -> float:
        return self.requests_total / self.batches_total if self.batches_total else 0.0


class Command(_Strict):
    """A command sent to one worker's private queue."""

    # "wake" does nothing: a worker sends it to itself so that the BRPOP in flight returns
    # and the next one includes a queue it just added (see CeleryConsumer.consume in workers/consumer.py)
    op: Literal["load", "unload", "wake"]
    model_id: str
    # For "unload": why, and whether requests still queued for the model must fail
    # (the model was unregistered) rather than wait for another copy.
    reason: str = ""
    fail_queued: bool = False
    # For "unload": the generation of the registration it is about (that record's
    # `created_at`). A command can wait in the queue of a dead worker for as long as the worker
    # stays away; if the model was registered again meanwhile, the command is stale and must
    # not fail the requests of the new registration (mesh/policy/commands.py). None: from a
    # sender that does not say (acted on as before).
    generation: float | None = None

    @field_validator("model_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return validate_id(v)
