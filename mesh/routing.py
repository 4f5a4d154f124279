"""Deprecated path, kept for celeryconfig files that name it: use mesh.control.routing."""
from mesh.control.routing import Router, route_task, router_for  # noqa: F401
