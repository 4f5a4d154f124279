"""Effective per-model configuration and where each value came from (the precedence
proposed in awslabs/multi-model-server#770; docs/configuration.md).

Precedence, highest first: per-request value (where allowed) > management API (`ModelInfo`)
> model manifest (repository) > global settings (`MESH_*`) > built-in defaults. Pure.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel

from mesh.models import BatchingConfig, ModelInfo, ModelRecord
from mesh.settings import MeshSettings

BATCHING_FIELDS = (
    "max_batch_size",
    "max_batch_delay_ms",
    "preferred_batch_sizes",
    "max_queue_size",
    "default_timeout_ms",
    "default_priority",
    "predict_timeout_s",
)


class Setting(BaseModel):
    value: Any
    source: str  # request | api | manifest | global | default


class EffectiveConfig(BaseModel):
    model_id: str
    values: dict[str, Setting]

    def value(self, name: str) -> Any:
        return self.values[name].value


def record_manifest(record: ModelRecord) -> BatchingConfig | None:
    """The manifest level of a record (filled by the model repository; None otherwise)."""
    manifest = getattr(record, "manifest", None)
    return getattr(manifest, "batching", manifest) if manifest is not None else None


@cache
def _builtin_defaults() -> MeshSettings:
    # Built once: `model_construct` resolves every field's default, and pydantic inspects each
    # default factory's signature to do it (~0.15 ms; 2 % of a worker's CPU on the multimodel
    # benchmark, where a load and a producer's config refresh each paid it).
    return MeshSettings.model_construct()


def builtin_default(name: str) -> Any:
    """A setting's built-in default (a copy: the list defaults are not shared with callers)."""
    return copy.copy(getattr(_builtin_defaults(), name))


def effective_config(
    model_id: str,
    info: ModelInfo,
    settings: MeshSettings,
    *,
    manifest: BatchingConfig | None = None,
) -> EffectiveConfig:
    env_set = settings.model_fields_set
    values: dict[str, Setting] = {}
    for name in BATCHING_FIELDS:
        api = getattr(info.batching, name) if info.batching else None
        man = getattr(manifest, name) if manifest else None
        if api is not None:
            values[name] = Setting(value=api, source="api")
        elif man is not None:
            values[name] = Setting(value=man, source="manifest")
        elif name in env_set:
            values[name] = Setting(value=getattr(settings, name), source="global")
        else:
            values[name] = Setting(value=builtin_default(name), source="default")
    return EffectiveConfig(model_id=model_id, values=values)


# Copy bounds (the scheduler's min/max copies per model): management API (`ModelInfo`) >
# manifest (`ModelRecord.manifest`) > global `MESH_DEFAULT_MIN_COPIES`/`MESH_DEFAULT_MAX_COPIES`.
COPIES_FIELDS = {"min_copies": "default_min_copies", "max_copies": "default_max_copies"}


def copies_bounds(record: ModelRecord) -> tuple[int | None, int | None]:
    """(min_copies, max_copies) set for this model at the api or manifest level; None: not set
    (the scheduler then applies the global default)."""
    manifest = getattr(record, "manifest", None)
    out = []
    for name in COPIES_FIELDS:
        api = getattr(record.info, name, None)
        out.append(api if api is not None else getattr(manifest, name, None))
    return out[0], out[1]


def copies_config(record: ModelRecord, settings: MeshSettings) -> dict[str, Setting]:
    """The copy bounds with their source, for `get_effective_config`."""
    manifest = getattr(record, "manifest", None)
    env_set = settings.model_fields_set
    values: dict[str, Setting] = {}
    for name, global_name in COPIES_FIELDS.items():
        api = getattr(record.info, name, None)
        man = getattr(manifest, name, None)
        if api is not None:
            values[name] = Setting(value=api, source="api")
        elif man is not None:
            values[name] = Setting(value=man, source="manifest")
        elif global_name in env_set:
            values[name] = Setting(value=getattr(settings, global_name, None), source="global")
        else:
            values[name] = Setting(value=builtin_default(global_name), source="default")
    return values


# Worker pools: the labels a worker must carry to hold the model. Management API (`ModelInfo`)
# > manifest (`ModelRecord.manifest`); there is no global level (a requirement every model
# shares is a pool every worker must join: set the workers' labels instead).
def required_labels(record: ModelRecord) -> dict[str, str]:
    """The labels the model requires ({} when none: any worker may hold it)."""
    return pick_required_labels(
        getattr(record.info, "required_labels", None),
        getattr(getattr(record, "manifest", None), "required_labels", None),
    )


def pick_required_labels(api: Any, manifest: Any) -> Any:
    """The rule itself, over the two levels' values however they were read (a parsed record
    above; a record's raw JSON where the autoscaling signals read thousands of them)."""
    if api is not None:
        return api
    return manifest or {}


def labels_config(record: ModelRecord) -> dict[str, Setting]:
    """`required_labels` with its source, for `get_effective_config`."""
    api = getattr(record.info, "required_labels", None)
    manifest = getattr(getattr(record, "manifest", None), "required_labels", None)
    if api is not None:
        return {"required_labels": Setting(value=api, source="api")}
    if manifest is not None:
        return {"required_labels": Setting(value=manifest, source="manifest")}
    return {"required_labels": Setting(value={}, source="default")}
