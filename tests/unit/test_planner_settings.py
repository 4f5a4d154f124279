"""The planner's knobs have one source: MeshSettings (its defaults and the MESH_* values)."""

from __future__ import annotations

import dataclasses

from mesh.policy.planner import SHARED_KNOBS, PlannerSettings
from mesh.settings import MeshSettings

PLANNER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PlannerSettings)}


def test_shared_knobs_default_to_the_mesh_settings_defaults():
    differ = {
        knob: (PLANNER_DEFAULTS[knob], MeshSettings.model_fields[knob].default)
        for knob in SHARED_KNOBS
        if PLANNER_DEFAULTS[knob] != MeshSettings.model_fields[knob].default
    }
    assert differ == {}


def test_every_knob_both_have_is_declared_shared():
    # a knob added to both by hand would get two defaults again; one renamed in one of them
    # would stop being shared
    assert set(SHARED_KNOBS) <= set(PLANNER_DEFAULTS)
    assert set(SHARED_KNOBS) <= set(MeshSettings.model_fields)
    assert set(PLANNER_DEFAULTS) & set(MeshSettings.model_fields) <= set(SHARED_KNOBS)


def test_from_settings_reads_every_shared_knob():
    # model_construct skips validation (and the environment), so each knob gets a value no
    # default could equal by accident
    values = {knob: object() for knob in SHARED_KNOBS}
    planner = PlannerSettings.from_settings(
        MeshSettings.model_construct(rebalance_interval_s=5.0, heartbeat_ttl_s=6.0, **values)
    )
    assert {knob: getattr(planner, knob) is values[knob] for knob in SHARED_KNOBS} == {
        knob: True for knob in SHARED_KNOBS
    }


def test_pending_work_outlasts_two_beats_and_a_heartbeat_ttl():
    slow = PlannerSettings.from_settings(MeshSettings.model_construct(rebalance_interval_s=30.0, heartbeat_ttl_s=6.0))
    assert (slow.pending_action_ttl_s, slow.stale_copy_s) == (66.0, 132.0)
    fast = PlannerSettings.from_settings(MeshSettings.model_construct(rebalance_interval_s=1.0, heartbeat_ttl_s=3.0))
    assert (fast.pending_action_ttl_s, fast.stale_copy_s) == (15.0, 30.0)
