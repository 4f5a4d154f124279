"""Deprecated path, kept for celeryconfig files copied before the layout of docs/architecture.md
("Code layout"), which import `mesh_celery_settings` from here: use mesh.broker.celery_options."""
from mesh.broker.celery_options import mesh_celery_settings  # noqa: F401
