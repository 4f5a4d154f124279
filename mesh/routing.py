"""Deprecated path, kept for celeryconfig files that name it (`task_routes`): use
mesh.control.routing (and mesh.protocol.messages for the header names)."""
from mesh.control.routing import Router, route_task, router_for  # noqa: F401
from mesh.protocol.messages import MODEL_HEADER, PRIORITIES, SENT_AT_HEADER, VMODEL_HEADER  # noqa: F401
