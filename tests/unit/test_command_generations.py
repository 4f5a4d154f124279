"""Whether a worker acts on an unload command, from the generations (mesh/policy/commands.py)."""

from __future__ import annotations

import pytest

from mesh.policy.commands import UnloadAction, unload_action


@pytest.mark.parametrize(
    ("generation", "registered", "loaded", "action"),
    [
        (None, 2.0, 1.0, UnloadAction.ACT),  # a sender that names no generation: as before
        (1.0, None, None, UnloadAction.ACT),  # still unregistered: fail what is queued
        (1.0, None, 1.0, UnloadAction.ACT),
        (1.0, 1.0, 1.0, UnloadAction.ACT),  # the registration it names is the current one
        (1.0, 2.0, None, UnloadAction.IGNORE),  # registered again: stale, nothing loaded here
        (1.0, 2.0, 2.0, UnloadAction.IGNORE),  # stale: the copy here is of the new registration
        (1.0, 2.0, 1.0, UnloadAction.RETIRE),  # stale, but the copy here is of the old one
    ],
)
def test_unload_action_from_generations(generation, registered, loaded, action):
    assert unload_action(generation, registered, loaded) is action
