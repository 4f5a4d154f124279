"""Deprecated path, kept for celeryconfig files that name it (`task_routes`): use
mesh.control.routing (and mesh.protocol.messages for the header names)."""
from mesh.control.routing import Router, route_task, router_for  # noqa: F401
from mesh.protocol.messages import (  # noqa: F401
    MODEL_HEADER,
    PRIORITIES,
    SENT_AT_HEADER,
    SERVING_TTL_S,
    VMODEL_HEADER,
)
