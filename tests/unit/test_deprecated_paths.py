"""Module paths users may have written in their own celeryconfig before the layout of
docs/architecture.md ("Code layout") still resolve, to the same objects."""

from __future__ import annotations

from kombu.utils.imports import symbol_by_name

from mesh.broker.transport import Transport
from mesh.control.routing import route_task
from mesh.protocol.messages import MODEL_HEADER


def test_old_celeryconfig_paths_resolve_to_the_new_objects():
    assert symbol_by_name("mesh.transport:Transport") is Transport
    assert symbol_by_name("mesh.routing.route_task") is route_task
    assert symbol_by_name("mesh.routing.MODEL_HEADER") is MODEL_HEADER


def test_a_celeryconfig_copied_before_the_layout_still_loads(tmp_path, monkeypatch):
    """The celeryconfig.py this project shipped before the layout, as a user would have copied
    it: its imports and every path it names still resolve."""
    old = (
        "from mesh.celery_config import mesh_celery_settings\n"
        "globals().update(mesh_celery_settings())\n"
        'broker_transport = "mesh.transport:Transport"\n'
        'task_routes = ("mesh.routing.route_task",)\n'
    )
    (tmp_path / "old_celeryconfig.py").write_text(old)
    monkeypatch.syspath_prepend(str(tmp_path))
    import old_celeryconfig

    assert symbol_by_name(old_celeryconfig.broker_transport) is Transport
    assert [symbol_by_name(r) for r in old_celeryconfig.task_routes] == [route_task]
    assert old_celeryconfig.result_backend.startswith("mesh.broker.results:")


def test_the_shipped_celeryconfig_names_the_new_paths():
    import celeryconfig

    assert symbol_by_name(celeryconfig.broker_transport) is Transport
    assert [symbol_by_name(r) for r in celeryconfig.task_routes] == [route_task]
