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


def test_the_shipped_celeryconfig_names_the_new_paths():
    import celeryconfig

    assert symbol_by_name(celeryconfig.broker_transport) is Transport
    assert [symbol_by_name(r) for r in celeryconfig.task_routes] == [route_task]
