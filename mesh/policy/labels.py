"""Worker pools: which workers may hold a model, by labels.

A worker carries labels (`MESH_WORKER_LABELS=env=sklearn-1.5,zone=a`, in its heartbeat); a
model may require some (`ModelInfo.required_labels`, or its repository manifest's). A worker
may hold the model only if it carries every required label with the same value: an exact
match, like a Kubernetes `nodeSelector`
(https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodeselector), and
what MLServer and ModelMesh users ask for to keep a scikit-learn pickle on the version that
wrote it. A model with no required labels goes anywhere.

Pure functions over plain data: the cold path (mesh/policy/placement.py), the planner
(mesh/policy/planner.py), the status (mesh/policy/status.py) and the worker's refusal
(workers/manager.py) all decide with these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mesh.protocol.labels import format_labels

NO_MATCHING_WORKER = "NO_MATCHING_WORKER"
# How many distinct label sets a reason lists before it says "and N more" (1,000 workers with
# per-host labels must not make a status megabytes long).
REASON_MAX_OFFERS = 8


def matches(required: Mapping[str, str] | None, offered: Mapping[str, str] | None) -> bool:
    """May a worker offering `offered` hold a model requiring `required`?"""
    if not required:
        return True
    if not offered:
        return False
    return all(offered.get(k) == v for k, v in required.items())


def no_match_reason(required: Mapping[str, str] | None, offered: Iterable[Mapping[str, str]]) -> str | None:
    """Why no live worker may hold the model, or None when one may (or nothing is required).

    `offered`: the labels of every live worker that is not shutting down. With no such worker
    at all there is no reason to give here: the model waits for workers like any other.
    """
    if not required:
        return None
    sets: list[str] = []
    seen: set[str] = set()
    any_worker = False
    for labels in offered:
        any_worker = True
        if matches(required, labels):
            return None
        text = "{" + format_labels(labels) + "}"
        if text not in seen:
            seen.add(text)
            sets.append(text)
    if not any_worker:
        return None
    sets.sort()
    shown = ", ".join(sets[:REASON_MAX_OFFERS])
    if len(sets) > REASON_MAX_OFFERS:
        shown += f" and {len(sets) - REASON_MAX_OFFERS} more"
    return f"{NO_MATCHING_WORKER}: needs {format_labels(required)}; live workers offer {shown}"


__all__ = ["NO_MATCHING_WORKER", "matches", "no_match_reason"]
