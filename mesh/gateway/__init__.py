"""The gateway: KServe V2 over gRPC and HTTP, and ModelMesh's management API, for clients that
do not speak Celery (docs/gateway.md). A producer like MeshClient: every request becomes an
ordinary `mesh.infer` message."""
