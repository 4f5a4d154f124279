"""Whether a worker acts on an unload command, from the generations involved (pure).

A command waits in a worker's private queue for as long as the worker is away: a worker
SIGKILLed and restarted under the same name reads what was sent to it meanwhile. An unload sent
when a model was unregistered (or auto-deleted) names that registration's generation (the
record's `created_at`, Command.generation). If the model was registered again since, the
command is stale: acting on it would fail the new registration's requests with "was
unregistered".
"""

from __future__ import annotations

from enum import Enum


class UnloadAction(Enum):
    ACT = "act"  # as told: the registration it names is gone (or the command names none)
    RETIRE = "retire"  # stale, but the copy here is of an older registration: unload it, fail nothing
    IGNORE = "ignore"  # stale, and nothing here is from an older registration


def unload_action(generation: float | None, registered: float | None, loaded: float | None) -> UnloadAction:
    """`generation`: the command's; `registered`: the generation of the model's current record
    (None: not registered); `loaded`: the generation of the record this worker's copy was
    loaded from (None: no copy loaded here)."""
    if generation is None or registered is None or registered == generation:
        return UnloadAction.ACT
    if loaded is not None and loaded != registered:
        return UnloadAction.RETIRE
    return UnloadAction.IGNORE
