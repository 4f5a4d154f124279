"""Which model a request is for: the body's model name, or ModelMesh's routing headers.

ModelMesh routes by `mm-model-id` (a concrete model) or `mm-vmodel-id` (an alias), or their
`-bin` forms carrying UTF-8 ids base64-encoded per gRPC's binary-header rule; both kinds at
once is INVALID_ARGUMENT (kserve/modelmesh src/main/java/com/ibm/watson/modelmesh/
GrpcSupport.java). Without a header, ModelMesh Serving reads the id from the request's
`model_name` as a *vmodel* id (kserve/modelmesh-serving controllers/modelmesh/
cluster_config.go); here a name that is no vmodel is then tried as a concrete model, so plain
models are addressable too. A version names the repository's concrete model `<name>@<version>`
(docs/storage.md). Pure functions: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.errors import InvalidArgument
from mesh.protocol.messages import MODEL_HEADER, VMODEL_HEADER


@dataclass(frozen=True)
class Target:
    """Exactly one of: a concrete model, a vmodel, or a name to resolve (vmodel, else model)."""

    model_id: str | None = None
    vmodel_id: str | None = None
    name: str | None = None

    @property
    def shown(self) -> str:
        return self.model_id or self.vmodel_id or self.name or ""


def _decode_bin(key: str, value: str | bytes) -> str:
    if isinstance(value, str):  # HTTP: the client base64-encoded it (padding optional)
        try:
            value = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"header {key}: not base64") from None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"header {key}: not UTF-8 once decoded") from None


def header_ids(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[list[str], list[str]]:
    """(model ids, vmodel ids) named by the routing headers; gRPC gives `-bin` values decoded
    (bytes), HTTP gives them as base64 text."""
    models: list[str] = []
    vmodels: list[str] = []
    for key, value in metadata:
        k = key.lower()
        base = k[:-4] if k.endswith("-bin") else k
        if base not in (MODEL_HEADER, VMODEL_HEADER):
            continue
        text = _decode_bin(k, value) if k.endswith("-bin") else (value.decode() if isinstance(value, bytes) else value)
        (models if base == MODEL_HEADER else vmodels).append(text)
    return models, vmodels


def pick(model_name: str, version: str, metadata: Iterable[tuple[str, str | bytes]]) -> Target:
    models, vmodels = header_ids(metadata)
    if models and vmodels:
        raise InvalidArgument("must include only one of model id and vmodel id")
    ids = models or vmodels
    if len(ids) > 1:
        # ModelMesh fans a request with several ids out to each; Mesh serves one model per request
        raise InvalidArgument(f"one {'model' if models else 'vmodel'} id per request, got {len(ids)}")
    if models:
        return Target(model_id=models[0])
    if vmodels:
        return Target(vmodel_id=vmodels[0])
    if not model_name:
        raise InvalidArgument(f"must include a model name, or the {MODEL_HEADER} / {VMODEL_HEADER} header")
    if version:
        return Target(model_id=f"{model_name}@{version}")
    return Target(name=model_name)
