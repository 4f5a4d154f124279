"""The gateway's two gRPC APIs, as message classes built from the committed protos.

- `grpc_predict_v2.proto`: the inference API (package `inference`), written for Mesh to be
  wire-compatible with KServe's V2 inference protocol (kserve/kserve, docs/predict-api/v2).
- `model-mesh.proto`: the management API (package `mmesh`), written for Mesh to be
  wire-compatible with ModelMesh's model-mesh.proto (kserve/modelmesh).

`descriptors.binpb` is their compiled FileDescriptorSet (docs/gateway.md says how to
regenerate it; tests/unit/test_gateway_protos.py fails when it drifts from the .proto files).
The classes live in a private descriptor pool, not protobuf's default one: a process that
also imports another copy of the same package (tritonclient's `inference` messages, a
ModelMesh client's `mmesh` stubs) would otherwise fail with "duplicate symbol".
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

HERE = Path(__file__).resolve().parent
PROTO_FILES = ("grpc_predict_v2.proto", "model-mesh.proto")
DESCRIPTORS = HERE / "descriptors.binpb"

V2_SERVICE = "inference.GRPCInferenceService"
MM_SERVICE = "mmesh.ModelMesh"


def _load() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


POOL = _load()


def _messages(file: str) -> SimpleNamespace:
    fd = POOL.FindFileByName(file)
    return SimpleNamespace(
        **{name: message_factory.GetMessageClass(d) for name, d in fd.message_types_by_name.items()}
    )


v2 = _messages("grpc_predict_v2.proto")
mm = _messages("model-mesh.proto")


def methods(service: str) -> dict[str, tuple[type, type]]:
    """Method name -> (request class, response class) of a service in the pool."""
    svc = POOL.FindServiceByName(service)
    return {
        m.name: (message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
        for m in svc.methods
    }
