"""Worker pools, the pure parts: label syntax, matching and the NO_MATCHING_WORKER reason
(mesh/protocol/labels.py, mesh/policy/labels.py); the cold path's choice, the planner's
placement and the status with labels; the precedence of `required_labels`; the setting."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from mesh.models import FailedCopy, ModelInfo, ModelManifest, ModelRecord, ModelState, WorkerState
from mesh.policy.labels import matches, no_match_reason
from mesh.policy.placement import choose_worker
from mesh.policy.planner import (
    ClusterState,
    CopyView,
    Load,
    PlannerSettings,
    RegisteredModel,
    RegistryCopy,
    Unload,
    WorkerView,
    plan,
)
from mesh.policy.precedence import labels_config, required_labels
from mesh.policy.status import model_status
from mesh.protocol.labels import format_labels, parse_labels, validate_labels
from mesh.settings import MeshSettings

NOW = 1_000_000.0
MB = 1024 * 1024
S = PlannerSettings(default_model_size_bytes=10 * MB, churn_age_s=60, proactive_loading=True)
A = {"env": "a"}
B = {"env": "b"}


# ----------------------------------------------------------------------------- syntax


def test_labels_parse_from_the_setting_and_format_back_sorted():
    assert parse_labels("env=sklearn-1.5, zone=a") == {"env": "sklearn-1.5", "zone": "a"}
    assert parse_labels("") == {} and parse_labels(None) == {}
    assert parse_labels("gpu=") == {"gpu": ""}
    assert format_labels({"zone": "a", "env": "x"}) == "env=x,zone=a"


@pytest.mark.parametrize("text", ["env", "=a", "env=a,env=b", "env=a b", "e nv=a", "env=a=b", "-x=a"])
def test_malformed_labels_are_refused_naming_the_entry(text):
    with pytest.raises(ValueError, match="MESH_WORKER_LABELS"):
        parse_labels(text)


def test_the_setting_is_checked_at_start_and_offered_as_a_mapping():
    assert MeshSettings(worker_labels="zone=a,env=b").labels == {"env": "b", "zone": "a"}
    assert MeshSettings().labels == {}
    with pytest.raises(ValidationError, match="not name=value"):
        MeshSettings(worker_labels="zone")


def test_model_info_and_manifest_validate_required_labels():
    info = ModelInfo(runtime="sklearn", uri="file:///m", required_labels={"env": "sklearn-1.5"})
    assert info.required_labels == {"env": "sklearn-1.5"}
    with pytest.raises(ValidationError, match="invalid label name"):
        ModelInfo(runtime="sklearn", uri="file:///m", required_labels={"bad name": "x"})
    with pytest.raises(ValidationError, match="invalid value"):
        ModelManifest(required_labels={"env": "a,b"})
    with pytest.raises(ValueError, match="at most 32"):
        validate_labels({f"k{i}": "v" for i in range(40)})


# ----------------------------------------------------------------------------- matching


def test_a_worker_matches_when_it_carries_every_required_label_with_its_value():
    assert matches({}, {}) and matches(None, {"env": "a"})
    assert matches(A, {"env": "a", "zone": "1"})
    assert not matches(A, {"env": "b"}) and not matches(A, {}) and not matches({"env": "a", "zone": "1"}, A)


def test_the_reason_names_what_is_needed_and_what_live_workers_offer():
    assert no_match_reason(A, [A, B]) is None  # someone may hold it
    assert no_match_reason({}, [B]) is None  # nothing required
    assert no_match_reason(A, []) is None  # no worker at all: it waits like any model
    assert no_match_reason({"env": "c"}, [B, {"env": "a", "zone": "1"}, B, {}]) == (
        "NO_MATCHING_WORKER: needs env=c; live workers offer {env=a,zone=1}, {env=b}, {}"
    )
    many = no_match_reason({"env": "c"}, [{"host": f"h{i:02d}"} for i in range(20)])
    assert many.endswith("and 12 more") and many.count("{host=") == 8


# ----------------------------------------------------------------------------- cold path


def ws(name: str, labels: dict[str, str], free: int = 100 * MB, shutting_down: bool = False) -> WorkerState:
    return WorkerState(name=name, host="h", pid=1, capacity_bytes=200 * MB, used_bytes=200 * MB - free,
                       started_at=0, updated_at=0, labels=labels, shutting_down=shutting_down)  # fmt: skip


def test_the_cold_path_chooses_only_among_workers_carrying_the_labels():
    workers = [ws("w1", B, free=190 * MB), ws("w2", A, free=10 * MB), ws("w3", {"env": "a", "zone": "1"}, free=50 * MB)]
    assert choose_worker(workers, model_id="m") == "w1"  # no requirement: the most free space
    assert choose_worker(workers, model_id="m", required_labels=A) == "w3"
    assert choose_worker(workers, model_id="m", required_labels={"zone": "1"}) == "w3"
    assert choose_worker(workers, model_id="m", required_labels={"env": "c"}) is None
    # full everywhere: the model's home is the home within its pool
    full = [ws(f"w{i}", A if i % 2 else B, free=0) for i in range(8)]
    for i in range(20):
        home = choose_worker(full, model_id=f"m{i}", size_hint=MB, required_labels=A)
        assert home in {w.name for w in full if w.labels == A}


# ----------------------------------------------------------------------------- planner


def worker(name, *copies, labels=None, capacity=100 * MB, shutting_down=False):
    return WorkerView(name=name, capacity=capacity, used=sum(c.size for c in copies),
                      models={c.model_id: c for c in copies}, labels=dict(labels or {}),
                      shutting_down=shutting_down)  # fmt: skip


def copy(model_id, *, idle=1000.0, age=5000.0, size=10 * MB):
    return CopyView(model_id=model_id, size=size, last_used=NOW - idle, loaded_at=NOW - age)


def on(name: str) -> dict[str, RegistryCopy]:
    return {name: RegistryCopy(state="LOADED", since=NOW - 5000)}


def loads(actions):
    return [(a.model_id, a.worker, a.reason) for a in actions if isinstance(a, Load)]


def run(workers, models, settings=S):
    return plan(ClusterState(workers=list(workers), models=list(models)), settings, NOW)


def test_queued_requests_get_a_copy_in_the_models_pool_even_with_more_room_elsewhere():
    cluster = [worker("big", capacity=1000 * MB), worker("wa", labels=A)]
    m = RegisteredModel("m", size=10 * MB, queue_depth=3, required_labels=A)
    assert loads(run(cluster, [m])) == [("m", "wa", "queued-requests")]


def test_pinned_copies_stay_within_the_pool_however_many_are_wanted():
    cluster = [worker(f"w{i}", labels=A if i < 2 else B) for i in range(6)]
    m = RegisteredModel("m", size=10 * MB, min_copies=4, required_labels=A)
    assert sorted(w for _, w, _ in loads(run(cluster, [m]))) == ["w0", "w1"]


def test_no_load_for_a_model_whose_pool_has_no_live_worker():
    cluster = [worker("wa", labels=A), worker("wb", labels=B)]
    models = [
        RegisteredModel("queued", size=10 * MB, queue_depth=5, required_labels={"env": "c"}),
        RegisteredModel("pinned", size=10 * MB, min_copies=1, required_labels={"env": "c"}),
        RegisteredModel("idle", size=10 * MB, last_used=NOW - 10, score=5.0, required_labels={"env": "c"}),
    ]
    assert loads(run(cluster, models)) == []
    # the pool's only worker is leaving: nothing to place on either
    assert loads(run([worker("wa", labels=A, shutting_down=True)], [RegisteredModel("m", queue_depth=1, required_labels=A)])) == []


def test_space_in_the_pool_is_made_by_evicting_there_not_elsewhere():
    full_a = worker("wa", *(copy(f"a{i}") for i in range(10)), labels=A)
    full_b = worker("wb", *(copy(f"b{i}", idle=5000.0) for i in range(10)), labels=B)  # colder: evicted first without labels
    models = [RegisteredModel(f"a{i}", size=10 * MB, copies=on("wa")) for i in range(10)]
    models += [RegisteredModel(f"b{i}", size=10 * MB, copies=on("wb")) for i in range(10)]
    models.append(RegisteredModel("new", size=10 * MB, queue_depth=2, required_labels=A))
    actions = run([full_a, full_b], models)
    assert [(m, w) for m, w, _ in loads(actions)] == [("new", "wa")]
    assert {a.worker for a in actions if isinstance(a, Unload)} == {"wa"}


@pytest.mark.parametrize("others", [1, 6])  # a pool of half the workers (the shared heap), of one in seven (a scan)
def test_space_in_the_pool_is_made_by_evicting_there_whatever_its_share_of_workers(others):
    cluster = [worker("wa", *(copy(f"a{i}") for i in range(10)), labels=A)]
    models = [RegisteredModel(f"a{i}", size=10 * MB, copies=on("wa")) for i in range(10)]
    for j in range(others):  # fuller of colder copies: evicted first but for the labels
        cluster.append(worker(f"wb{j}", *(copy(f"b{j}-{i}", idle=5000.0) for i in range(10)), labels=B))
        models += [RegisteredModel(f"b{j}-{i}", size=10 * MB, copies=on(f"wb{j}")) for i in range(10)]
    models += [RegisteredModel(f"new{k}", size=10 * MB, queue_depth=2, required_labels=A) for k in range(3)]
    actions = run(cluster, models)
    assert sorted(loads(actions)) == [(f"new{k}", "wa", "queued-requests") for k in range(3)]
    assert {a.worker for a in actions if isinstance(a, Unload)} == {"wa"}


def test_proactive_loads_stay_in_the_pool():
    cluster = [worker("wb", labels=B, capacity=1000 * MB), worker("wa", labels=A)]
    m = RegisteredModel("hot", size=10 * MB, last_used=NOW - 10, score=50.0, required_labels=A)
    assert loads(run(cluster, [m])) == [("hot", "wa", "proactive")]


def test_labels_change_nothing_for_models_that_require_none():
    cluster = [worker("wb", labels=B, capacity=1000 * MB), worker("wa", labels=A)]
    m = RegisteredModel("m", size=10 * MB, queue_depth=3)
    assert loads(run(cluster, [m])) == [("m", "wb", "queued-requests")]


# ----------------------------------------------------------------------------- status, precedence


def test_the_status_carries_the_reason_only_while_there_is_no_live_copy():
    common = dict(registered=True, failures=[], load_claimed=False, now=time.time(), load_failure_expiry_s=300)
    st = model_status("m", copies=[], live_workers={"w1"}, unservable="NO_MATCHING_WORKER: x", **common)
    assert st.state is ModelState.NOT_LOADED and st.reason == "NO_MATCHING_WORKER: x"
    failed = FailedCopy(worker="w1", error="boom", time=time.time())
    st = model_status("m", copies=[], live_workers={"w1"}, unservable="NO_MATCHING_WORKER: x",
                      **{**common, "failures": [failed]})  # fmt: skip
    assert st.state is ModelState.LOADING_FAILED and st.reason.startswith("NO_MATCHING_WORKER")
    assert model_status("m", copies=[], live_workers=set(), **common).reason == ""


def test_required_labels_come_from_the_api_over_the_manifest():
    info = ModelInfo(runtime="sklearn", uri="file:///m")
    plain = ModelRecord(model_id="m", info=info)
    assert required_labels(plain) == {} and labels_config(plain)["required_labels"].source == "default"
    from_manifest = ModelRecord(model_id="m", info=info, manifest=ModelManifest(required_labels=B))
    assert required_labels(from_manifest) == B and labels_config(from_manifest)["required_labels"].source == "manifest"
    both = ModelRecord(model_id="m", info=info.model_copy(update={"required_labels": A}),
                       manifest=ModelManifest(required_labels=B))  # fmt: skip
    assert required_labels(both) == A and labels_config(both)["required_labels"].source == "api"
    # an explicit empty requirement at the api level overrides the manifest's
    none = ModelRecord(model_id="m", info=info.model_copy(update={"required_labels": {}}),
                       manifest=ModelManifest(required_labels=B))  # fmt: skip
    assert required_labels(none) == {}
