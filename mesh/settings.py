"""Global settings (pydantic-settings, environment prefix `MESH_`).

This is the lowest level of configuration precedence above the built-in defaults:
per-request > management API (ModelInfo) > model manifest > these settings > defaults.
docs/configuration.md lists every field with its default and where it applies.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh.protocol.ids import validate_prefix
from mesh.protocol.labels import format_labels, parse_labels


class MeshSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    # --- where state lives
    redis_url: str | None = Field(
        default=None,
        description="Redis for broker, results and state. Unset: 127.0.0.1:6379 if it answers, "
        "else the scripts/`mesh up` start an embedded redis-server.",
    )
    prefix: str = Field(
        default="mesh",
        description="Namespace of every Redis key and queue name (ModelMesh's root_prefix).",
    )
    sentinel_master: str | None = Field(
        default=None,
        description="sentinel:// URLs only: the name of the master the sentinels monitor "
        "(Celery's `master_name` transport option; docs/operations.md, \"Redis Sentinel\")",
    )
    redis_ca_certs: str | None = Field(
        default=None,
        description="rediss:// only: CA bundle (PEM) that signed the Redis server's certificate "
        "(unset: the system's CAs). The certificate is always verified.",
    )
    redis_certfile: str | None = Field(
        default=None, description="rediss:// only: client certificate (PEM) when Redis asks for one"
    )
    redis_keyfile: str | None = Field(
        default=None, description="rediss:// only: private key (PEM) of MESH_REDIS_CERTFILE"
    )

    # --- worker
    worker_capacity_bytes: int = Field(default=2 * 1024**3, ge=1)
    worker_labels: str = Field(
        default="",
        description="this worker's labels, name=value pairs separated by commas (e.g. "
        "'env=sklearn-1.5,zone=a'): it holds only models whose required_labels it carries",
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=6.0, gt=0)
    load_timeout_s: float = Field(default=120.0, gt=0)
    loading_concurrency: int = Field(default=1, ge=1, le=64)
    load_prefetch: int = Field(
        default=2,
        ge=0,
        le=64,
        description="loads waiting in a worker's line whose record, files and reload snapshot "
        "are fetched while the loads ahead of them run (0: fetch each when its turn comes)",
    )
    eviction_policy: Literal["usage", "lru"] = Field(
        default="usage",
        description="which model a full worker evicts first: 'usage' = lowest decayed request "
        "count, then least recently used (the planner's order); 'lru' = least recently used "
        "(ModelMesh's)",
    )
    reload_snapshots: bool = Field(
        default=True,
        description="keep a snapshot of each loaded model in the disk cache that reloads read "
        "instead of the model's files, where the runtime offers one (sklearn: 5-7x faster)",
    )
    fresh_overcommit_fraction: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="how far above its capacity (a fraction of it) a worker may hold copies "
        "that have not answered since their load, rather than evict a more used model in "
        "their place; once one has answered, the worker evicts by its policy again, usually that "
        "copy (0: never above capacity)",
    )
    eviction_decay_s: float = Field(
        default=120.0,
        gt=0,
        description="time constant of the request counts the 'usage' eviction policy compares "
        "(a count falls by e in this time)",
    )
    intra_op_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="BLAS/OpenMP threads per worker process (several workers share the cores)",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus metrics port of a worker (0: off)"
    )
    metrics_addr: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address the metrics port binds (unauthenticated: 0.0.0.0 only where the "
        "network is the access control, e.g. a container scraped by Prometheus)",
    )
    exporter_port: int = Field(
        default=9808, ge=0, le=65535,
        description="port of `mesh exporter`, the mesh's cluster-level signals (0 in `mesh up`: none)",
    )
    exporter_addr: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address `mesh exporter` binds (unauthenticated, like MESH_METRICS_ADDR)",
    )
    signals_top_n: int = Field(
        default=50, ge=0, le=10_000,
        description="models with per-model signal series (the most pending); the rest only in aggregates",
    )
    signals_top_pools: int = Field(
        default=20, ge=0, le=1_000,
        description="worker pools with their own signal series (the most demand); the rest summed as `other`",
    )
    signals_min_interval_s: float = Field(
        default=1.0, ge=0,
        description="the exporter reads Redis at most this often; scrapes in between share a reading",
    )
    prefetch_floor: int = Field(
        default=64, ge=1, description="prefetch when no model is loaded (commands, cold loads)"
    )
    max_buffered_bytes: int = Field(
        default=256 * 1024**2,
        ge=64 * 1024,
        description="request bytes (their JSON bodies) a worker holds buffered at most: past "
        "it, it takes no more messages until its buffers drain (they wait in Redis)",
    )
    metrics_retention_s: float = Field(
        default=600.0,
        gt=0,
        description="a model's metric series are removed once it has been gone from the worker this long",
    )

    # --- batching and queue policy defaults (global level of precedence)
    max_batch_size: int = Field(default=32, ge=1, le=65536)
    max_batch_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=60_000,
        description="0 (Triton's default): batches form from what accumulates while the "
        "previous batch runs, and a lone request never waits",
    )
    preferred_batch_sizes: list[int] = Field(default_factory=list, description="JSON list, e.g. [8,16]")
    max_queue_size: int = Field(default=0, ge=0, description="0: no limit")
    default_timeout_ms: float = Field(default=0.0, ge=0, description="0: no timeout")
    default_priority: Literal["high", "normal"] = "normal"
    predict_timeout_s: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="a predict call running longer fails its batch (DEADLINE_EXCEEDED) and takes "
        "the copy out of service (0: no watchdog)",
    )

    # --- failures and requests
    load_failure_expiry_s: float = Field(
        default=300.0, gt=0, description="a failure record blocks loads on that worker this long"
    )
    max_load_attempts: int = Field(
        default=3, ge=1, description="fresh failures after which requests fail fast"
    )
    max_request_bytes: int = Field(default=16 * 1024**2, ge=1024)
    raw_tensors: bool = Field(
        default=True,
        description="MeshClient sends numeric and BOOL arrays as base64 of their bytes (`raw`) "
        "instead of JSON numbers; false for workers older than the raw form (docs/messages.md)",
    )
    result_expires_s: int = Field(default=3600, ge=1)
    visibility_timeout_s: int = Field(
        default=300, ge=10, description="unacked messages of a dead worker return after this"
    )
    max_deliveries: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="deliveries of a message that end with its worker dead or stalled (not "
        "acked, not handed back) after which it is dead-lettered instead of delivered again, "
        "and its producer answered ABORTED (0: never)",
    )
    polling_interval_s: float = Field(
        default=0.1, gt=0, description="idle wait on the queues' bells before polling them anyway"
    )

    stray_sweep_interval_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="how often one worker of the pool looks for requests queued for models no "
        "longer registered (put back by a visibility sweep, say) and answers them NOT_FOUND",
    )
    stray_grace_s: float = Field(
        default=10.0, ge=0, le=3600,
        description="requests of an unregistered model are answered NOT_FOUND only once its queue "
        "has been seen holding them this long: a model registered again within it keeps them",
    )
    stray_scan_keys: int = Field(
        default=10_000, ge=1000, le=10_000_000,
        description="keys of the Redis keyspace each stray sweep scans for model queues (the "
        "backstop for requests put back long after their model went)",
    )

    # --- storage, disk cache and model repository (docs/storage.md)
    storage_config: SecretStr | None = Field(
        default=None,
        description="S3 storage config, ModelMesh Serving's shape ({key: {type: s3, "
        "access_key_id, secret_access_key, endpoint_url, bucket, region, certificate}}): "
        "a path to a JSON file or the JSON itself. Secret: never logged.",
    )
    disk_cache_dir: str | None = Field(
        default=None,
        description="per-host disk cache of downloaded models, shared by the host's workers "
        "(unset: $XDG_CACHE_HOME or ~/.cache, then mesh/models)",
    )
    disk_cache_bytes: int = Field(
        default=10 * 1024**3, ge=1, description="byte budget of the disk cache (LRU beyond it)"
    )
    s3_connect_timeout_s: float = Field(default=5.0, gt=0, description="S3 connect timeout")
    s3_read_timeout_s: float = Field(default=30.0, gt=0, description="S3 read timeout")
    s3_max_attempts: int = Field(
        default=3, ge=1, le=10, description="S3 attempts per call (retries of transient errors)"
    )
    storage_roots: str | None = Field(
        default=None,
        description="where workers may load models from: comma-separated file:///dir, "
        "s3://bucket, s3://bucket/prefix, or * for anywhere (unset: MESH_MODEL_DIR and the "
        "buckets of MESH_STORAGE_CONFIG; anywhere, with a warning, when neither is set)",
    )
    python_modules: str | None = Field(
        default=None,
        description="modules (and their submodules) python-runtime model classes may come "
        "from, comma-separated (unset: none; the python runtime refuses every class)",
    )
    model_dir: str | None = Field(
        default=None,
        description="model repository, a local directory or an s3://bucket/prefix: "
        "<name>/<version>/... served as <name>@<version>, vmodel <name> = latest",
    )
    model_dir_storage_key: str | None = Field(
        default=None, description="storage config key for an s3:// MESH_MODEL_DIR"
    )
    repository_sync_interval_s: float = Field(
        default=10.0, gt=0, description="how often the beat scheduler syncs the repository"
    )

    # --- the beat scheduler (docs/scheduler.md); also the defaults of mesh/policy/planner.py PlannerSettings
    rebalance_interval_s: float = Field(
        default=5.0, gt=0, description="how often celery beat sends mesh.rebalance"
    )
    rebalance_lock_ttl_s: float = Field(
        default=60.0, gt=0, description="leader lock lease: longer than the slowest run"
    )
    worker_control_queue: bool = Field(
        default=True,
        description="mesh workers also consume <prefix>.control (where mesh.rebalance runs); "
        "false: only workers started with -Q <prefix>.control run it",
    )
    scale_up_rps_per_copy: float = Field(
        default=50.0, gt=0, description="requests/s per copy above which a model gets more copies"
    )
    scale_up_queue_per_copy: int = Field(
        default=64, ge=1, description="queued requests per loaded copy that add a copy"
    )
    scale_down_ratio: float = Field(
        default=0.5, gt=0, le=1, description="hysteresis: n copies stay while rate > (n-1) x threshold x ratio"
    )
    copy_idle_s: float = Field(
        default=300.0, gt=0, description="extra copies of a model unused this long are unloaded"
    )
    model_idle_s: float = Field(
        default=0.0, ge=0, description="unload the last copy after this long unused (0: never)"
    )
    churn_age_s: float = Field(
        default=60.0, ge=0, description="copies younger, or used more recently, are not evicted"
    )
    default_min_copies: int = Field(default=0, ge=0, le=1024, description="min copies when a model sets none")
    default_max_copies: int | None = Field(
        default=None, ge=1, le=1024, description="max copies when a model sets none (unset: no limit)"
    )
    proactive_loading: bool = Field(
        default=True, description="load used-before models into free space and swap in valuable ones"
    )
    proactive_fill_fraction: float = Field(
        default=0.9, gt=0, le=1, description="proactive loads fill a worker up to this fraction"
    )
    drain_recent_s: float = Field(
        default=3600.0, ge=0, description="a draining worker's models used this recently move first"
    )
    max_loads_per_tick: int = Field(default=256, ge=1, description="loads one rebalance run may send")
    max_loads_per_worker: int = Field(default=4, ge=1, description="loads per worker per run")
    max_evictions_per_tick: int = Field(default=128, ge=0, description="evictions one run may send")
    usage_decay_s: float = Field(
        default=3600.0, gt=0, description="time constant of a model's decayed request rate (its value in cache)"
    )
    default_model_size_bytes: int = Field(
        default=64 * 1024**2, ge=1, description="size assumed for placement before a model's first load"
    )
    planner_refresh_runs: int = Field(
        default=60,
        ge=1,
        description="the scheduler re-reads only the models the change log names, plus a slice of "
        "the registry each run so that every model is re-read within this many runs",
    )

    # --- the gateway (`mesh gateway`, docs/gateway.md)
    gateway_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address the gateway's gRPC and HTTP ports bind; its management API needs "
        "no login (docs/security.md), so widen it only where the network is the access control",
    )
    gateway_grpc_port: int = Field(
        default=8033, ge=0, le=65535,
        description="KServe V2 gRPC and ModelMesh's management API (ModelMesh Serving's port; "
        "0: any free port, announced on the gateway's ready line)",
    )
    gateway_http_port: int = Field(
        default=8008, ge=-1, le=65535,
        description="KServe V2 REST (0: any free port, announced; -1: no HTTP server)",
    )
    gateway_max_message_bytes: int = Field(
        default=16 * 1024**2, ge=4096,
        description="largest gRPC message or HTTP body the gateway accepts (ModelMesh's "
        "MM_SVC_GRPC_MAX_MSG_SIZE default)",
    )
    gateway_management: bool = Field(
        default=True,
        description="serve ModelMesh's management API (mmesh.ModelMesh) on the gRPC port",
    )
    gateway_request_timeout_s: float = Field(
        default=60.0, gt=0, le=365 * 24 * 3600,
        description="deadline of a gateway inference request that brings none of its own (no gRPC "
        "deadline, no `timeout` parameter): it fails with DEADLINE_EXCEEDED / HTTP 504 after "
        "this, and is never run after it",
    )
    gateway_reflection: bool = Field(
        default=True,
        description="serve gRPC server reflection (grpc.reflection.v1alpha.ServerReflection) on "
        "the gRPC port, as Triton does: `grpcurl -plaintext HOST:PORT list` works",
    )

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        return validate_prefix(v)

    @field_validator("worker_labels")
    @classmethod
    def _valid_labels(cls, v: str) -> str:
        return format_labels(parse_labels(v))  # a bad entry fails at start, named

    @property
    def labels(self) -> dict[str, str]:
        """MESH_WORKER_LABELS as a mapping."""
        return parse_labels(self.worker_labels)


@lru_cache(maxsize=1)
def get_settings() -> MeshSettings:
    return MeshSettings()
