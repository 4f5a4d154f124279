"""The planner's rules, one by one, on small hand-built clusters (pure: no Redis, no workers)."""

from __future__ import annotations

import time

import pytest

from mesh.models import ModelInfo
from mesh.policy.planner import (
    ClearFailure,
    ClusterState,
    CopyView,
    DropCopy,
    FailureView,
    ForgetWorker,
    Load,
    PastAction,
    PlannerSettings,
    RegisteredModel,
    RegistryCopy,
    Unload,
    WorkerView,
    plan,
)

NOW = 1_000_000.0
MB = 1024 * 1024
S = PlannerSettings(
    default_model_size_bytes=10 * MB,
    churn_age_s=60,
    copy_idle_s=300,
    scale_up_rps_per_copy=10,
    scale_up_queue_per_copy=50,
    second_copy_min_age_s=420,
    swap_factor=2.0,
)


def copy(model_id, *, size=10 * MB, idle=1000.0, age=5000.0, rate=0.0):
    """A loaded copy last used `idle` seconds ago and loaded `age` seconds ago."""
    return CopyView(model_id=model_id, size=size, last_used=NOW - idle, loaded_at=NOW - age, rate=rate)


def worker(name, *copies, capacity=100 * MB, loading=(), shutting_down=False, alive=True, rate=None, extra_used=0):
    models = {c.model_id: c for c in copies}
    used = sum(c.size for c in copies) + extra_used
    return WorkerView(
        name=name, capacity=capacity, used=used, models=models, loading=set(loading),
        shutting_down=shutting_down, alive=alive,
        rate=sum(c.rate for c in copies) if rate is None else rate,
    )  # fmt: skip


def model(model_id, *, on=(), size=10 * MB, **kw):
    """A registered model whose registry lists copies on the workers in `on` (LOADED)."""
    copies = {w: RegistryCopy(state="LOADED", since=NOW - 5000, raw=f"{model_id}@{w}") for w in on}
    return RegisteredModel(model_id=model_id, size=size, copies=copies, **kw)


def run(workers, models, history=(), settings=S, now=NOW):
    return plan(ClusterState(workers=list(workers), models=list(models), history=list(history)), settings, now)


def loads(actions):
    return [(a.model_id, a.worker, a.reason) for a in actions if isinstance(a, Load)]


def unloads(actions):
    return [(a.model_id, a.worker, a.reason) for a in actions if isinstance(a, Unload)]


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ----------------------------------------------------------------------------- steady state


def test_a_quiet_cluster_needs_nothing():
    ws = [worker("w1", copy("a"), copy("b")), worker("w2", copy("c"))]
    ms = [model("a", on=["w1"]), model("b", on=["w1"]), model("c", on=["w2"])]
    assert run(ws, ms) == []


def test_plan_is_deterministic():
    ws = [worker(f"w{i}", *(copy(f"m{i}_{j}", idle=10 * j) for j in range(5))) for i in range(4)]
    ms = [model(f"m{i}_{j}", on=[f"w{i}"]) for i in range(4) for j in range(5)]
    ms += [model(f"x{k}", last_used=NOW - k) for k in range(30)]
    assert run(ws, ms) == run(ws, ms)


# ----------------------------------------------------------------------------- placement (docs/scheduler.md)


def test_orphaned_queue_gets_a_copy_on_the_worker_with_most_free_space():
    ws = [worker("w1", copy("a"), copy("b")), worker("w2", copy("c")), worker("w3", copy("d"), copy("e"))]
    ms = [model(m, on=[w]) for m, w in [("a", "w1"), ("b", "w1"), ("c", "w2"), ("d", "w3"), ("e", "w3")]]
    ms.append(model("q", queue_depth=3))
    assert loads(run(ws, ms)) == [("q", "w2", "queued-requests")]


def test_placement_skips_busy_workers_when_another_fits():
    ws = [worker("w1", copy("a"), rate=500.0), worker("w2", copy("b"), copy("c")), worker("w3", copy("d"))]
    ms = [model("a", on=["w1"]), model("b", on=["w2"]), model("c", on=["w2"]), model("d", on=["w3"])]
    ms.append(model("q", queue_depth=1))
    # w1 and w3 have the same free space; w1 answers 500 req/s, w3 none
    assert loads(run(ws, ms)) == [("q", "w3", "queued-requests")]


def test_placement_when_full_evicts_the_globally_least_recently_used_copy():
    cap = 30 * MB
    ws = [
        worker("w1", copy("a", idle=500), copy("b", idle=400), copy("c", idle=300), capacity=cap),
        worker("w2", copy("d", idle=9000), copy("e", idle=100), copy("f", idle=200), capacity=cap),
    ]
    ms = [model(m, on=[w]) for m, w in [("a", "w1"), ("b", "w1"), ("c", "w1"), ("d", "w2"), ("e", "w2"), ("f", "w2")]]
    ms.append(model("q", queue_depth=1))
    actions = run(ws, ms)
    assert unloads(actions) == [("d", "w2", "space")]
    assert loads(actions) == [("q", "w2", "queued-requests")]
    # unloads are sent before the load they make room for
    kinds = [type(a) for a in actions]
    assert kinds.index(Unload) < kinds.index(Load)


def test_a_large_model_evicts_several_cold_copies_on_one_worker_only():
    cap = 40 * MB
    ws = [
        worker("w1", *(copy(f"a{i}", idle=5000 + i) for i in range(4)), capacity=cap),
        worker("w2", *(copy(f"b{i}", idle=100 + i) for i in range(4)), capacity=cap),
    ]
    ms = [model(f"a{i}", on=["w1"]) for i in range(4)] + [model(f"b{i}", on=["w2"]) for i in range(4)]
    ms.append(model("big", size=25 * MB, queue_depth=1))
    actions = run(ws, ms)
    assert sorted(unloads(actions)) == [("a1", "w1", "space"), ("a2", "w1", "space"), ("a3", "w1", "space")]
    assert loads(actions) == [("big", "w1", "queued-requests")]


def test_nothing_is_placed_on_a_worker_that_is_shutting_down_or_failed_the_model():
    ws = [worker("w1", shutting_down=True), worker("w2"), worker("w3", copy("x"))]
    ms = [
        model("x", on=["w3"]),
        model("q", queue_depth=2, failures={"w2": FailureView(time=NOW - 10, error="boom")}),
    ]
    assert loads(run(ws, ms)) == [("q", "w3", "queued-requests")]


def test_load_budget_per_worker_spreads_a_burst():
    s = PlannerSettings(default_model_size_bytes=10 * MB, max_loads_per_worker=2)
    ws = [worker("w1", capacity=1000 * MB), worker("w2", capacity=200 * MB)]
    ms = [model(f"q{i}", queue_depth=1) for i in range(4)]
    placed = loads(run(ws, ms, settings=s))
    assert len(placed) == 4
    assert sorted(w for _, w, _ in placed) == ["w1", "w1", "w2", "w2"]


def test_global_load_budget_is_respected():
    s = PlannerSettings(default_model_size_bytes=MB, max_loads_per_tick=3, max_loads_per_worker=100)
    ms = [model(f"q{i}", queue_depth=1) for i in range(10)]
    assert len(loads(run([worker("w1")], ms, settings=s))) == 3


# ----------------------------------------------------------------------------- copies from load (docs/scheduler.md)


def test_rate_over_the_threshold_adds_copies_and_at_most_doubles_per_run():
    ws = [worker("w1", copy("hot", rate=45.0, idle=0)), worker("w2"), worker("w3"), worker("w4"), worker("w5")]
    ms = [model("hot", on=["w1"])]
    placed = loads(run(ws, ms))  # 45 req/s at 10 per copy wants 5; one copy may become two
    assert [(m, r) for m, _, r in placed] == [("hot", "scale-up")]
    ws[1] = worker("w2", copy("hot", rate=22.0, idle=0, age=5))
    ws[0] = worker("w1", copy("hot", rate=23.0, idle=0))
    placed = loads(run(ws, ms))
    assert len(placed) == 2 and {w for _, w, _ in placed} <= {"w3", "w4", "w5"}


def test_queue_depth_adds_a_copy_even_at_a_low_measured_rate():
    ws = [worker("w1", copy("m", rate=1.0, idle=0, age=100)), worker("w2")]
    assert loads(run(ws, [model("m", on=["w1"], queue_depth=51)])) == [("m", "w2", "scale-up")]
    assert loads(run(ws, [model("m", on=["w1"], queue_depth=50)])) == []


def test_queue_depth_does_not_add_copies_while_one_is_loading():
    ws = [worker("w1", copy("m", rate=1.0, idle=0)), worker("w2", loading=["m"]), worker("w3")]
    assert loads(run(ws, [model("m", on=["w1"], queue_depth=500)])) == []


def test_hysteresis_a_copy_is_kept_until_the_rate_falls_well_below_the_threshold():
    # 2 copies at 10 req/s per copy threshold, ratio 0.5: kept while rate > 5
    cap = 30 * MB

    def cluster(rate):
        ws = [
            worker("w1", copy("hot", rate=rate / 2, idle=0), copy("x1", idle=4000), copy("x2", idle=4000), capacity=cap),
            worker("w2", copy("hot", rate=rate / 2, idle=0), copy("y1", idle=3000), copy("y2", idle=3000), capacity=cap),
        ]
        ms = [model("hot", on=["w1", "w2"]), model("x1", on=["w1"]), model("x2", on=["w1"]),
              model("y1", on=["w2"]), model("y2", on=["w2"]), model("q", queue_depth=1)]  # fmt: skip
        return ws, ms

    # at 8 req/s (below the scale-up point of 10 but above 5) the second copy is not surplus:
    # the orphan evicts the oldest ordinary copy instead
    ws, ms = cluster(8.0)
    assert unloads(run(ws, ms)) == [("x1", "w1", "space")] or unloads(run(ws, ms)) == [("x2", "w1", "space")]
    # at 4 req/s it is surplus and goes first, although it was used just now
    ws, ms = cluster(4.0)
    gone = unloads(run(ws, ms))
    assert len(gone) == 1 and gone[0][0] == "hot" and gone[0][2] == "space"


def test_a_model_at_the_threshold_is_not_scaled_up_and_down_in_turn():
    ws = [worker("w1", copy("m", rate=10.0, idle=0, age=100)), worker("w2")]
    assert run(ws, [model("m", on=["w1"])]) == []  # exactly at the threshold: stays at 1
    ws = [worker("w1", copy("m", rate=6.0, idle=0)), worker("w2", copy("m", rate=6.0, idle=0))]
    assert run(ws, [model("m", on=["w1", "w2"])]) == []  # 12 req/s on 2: neither up nor down


def test_max_copies_caps_scale_up_and_removes_extra_copies():
    ws = [worker("w1", copy("m", rate=100.0, idle=0)), worker("w2"), worker("w3")]
    assert loads(run(ws, [model("m", on=["w1"], max_copies=1)])) == []
    ws = [worker(f"w{i}", copy("m", rate=1.0, idle=0, age=10)) for i in range(3)]
    gone = unloads(run(ws, [model("m", on=["w0", "w1", "w2"], max_copies=2)]))
    assert len(gone) == 1 and gone[0][2] == "max-copies"


# ----------------------------------------------------------------------------- pinning (kserve/modelmesh-serving#393)


def test_a_pinned_model_is_loaded_proactively_up_to_its_minimum():
    ws = [worker("w1"), worker("w2"), worker("w3")]
    placed = loads(run(ws, [model("p", min_copies=2)]))
    assert len(placed) == 2 and all(r == "min-copies" for _, _, r in placed)
    assert len({w for _, w, _ in placed}) == 2


def test_a_pinned_model_is_never_evicted_below_its_minimum():
    cap = 20 * MB
    ws = [worker("w1", copy("p", idle=90000), copy("a", idle=100), capacity=cap)]
    ms = [model("p", on=["w1"], min_copies=1), model("a", on=["w1"]), model("q", queue_depth=1)]
    actions = run(ws, ms)
    assert ("p", "w1", "space") not in unloads(actions)
    assert unloads(actions) == [("a", "w1", "space")]


def test_pinned_copies_stay_when_idle():
    ws = [worker("w1", copy("p", idle=90000)), worker("w2", copy("p", idle=90000))]
    s = PlannerSettings(default_model_size_bytes=10 * MB, model_idle_s=60)
    assert run(ws, [model("p", on=["w1", "w2"], min_copies=2)], settings=s) == []


def test_model_info_carries_min_and_max_copies():
    info = ModelInfo(runtime="sklearn", uri="file:///m.joblib", min_copies=1, max_copies=3)
    assert (info.min_copies, info.max_copies) == (1, 3)
    assert ModelInfo(runtime="sklearn", uri="file:///m.joblib").min_copies is None
    with pytest.raises(ValueError):
        ModelInfo(runtime="sklearn", uri="file:///m.joblib", min_copies=3, max_copies=2)


def test_default_min_copies_from_settings_apply_to_every_model():
    s = PlannerSettings(default_model_size_bytes=10 * MB, default_min_copies=1)
    placed = loads(run([worker("w1")], [model("a"), model("b", min_copies=0)], settings=s))
    assert placed == [("a", "w1", "min-copies")]


# ----------------------------------------------------------------------------- scale-down


def test_extra_copies_are_given_back_when_idle():
    ws = [worker("w1", copy("m", idle=400)), worker("w2", copy("m", idle=400)), worker("w3", copy("m", idle=400))]
    gone = unloads(run(ws, [model("m", on=["w1", "w2", "w3"])]))
    assert len(gone) == 2 and all(r == "idle" for _, _, r in gone)


def test_extra_copies_stay_while_the_model_is_used_and_space_is_not_needed():
    ws = [worker("w1", copy("m", idle=10, rate=1.0)), worker("w2", copy("m", idle=10, rate=1.0))]
    assert run(ws, [model("m", on=["w1", "w2"])]) == []


def test_the_last_copy_stays_by_default_and_goes_after_model_idle_s_when_set():
    ws = [worker("w1", copy("m", idle=10_000))]
    assert run(ws, [model("m", on=["w1"])]) == []
    s = PlannerSettings(default_model_size_bytes=10 * MB, model_idle_s=3600)
    assert unloads(run(ws, [model("m", on=["w1"])], settings=s)) == [("m", "w1", "idle")]
    # ...and a model idle-unloaded that way is not loaded back proactively
    assert loads(run([worker("w1")], [model("m", last_used=NOW - 10_000)], settings=s)) == []


def test_young_copies_are_not_scaled_down():
    ws = [worker("w1", copy("m", idle=400, age=30)), worker("w2", copy("m", idle=400, age=30))]
    assert run(ws, [model("m", on=["w1", "w2"])]) == []


# ----------------------------------------------------------------------------- churn guard


def test_churn_guard_a_recently_used_copy_is_not_evicted_for_a_scale_up():
    cap = 20 * MB
    ws = [
        worker("w1", copy("hot", rate=50.0, idle=0), copy("a", idle=5), capacity=cap),
        worker("w2", copy("b", idle=10), copy("c", idle=20), capacity=cap),
    ]
    ms = [model("hot", on=["w1"]), model("a", on=["w1"]), model("b", on=["w2"]), model("c", on=["w2"])]
    assert run(ws, ms) == []  # every other copy was used within churn_age_s


def test_churn_guard_a_young_copy_is_not_evicted_even_for_queued_requests():
    cap = 20 * MB
    ws = [worker("w1", copy("a", idle=3000, age=10), copy("b", idle=3000, age=20), capacity=cap)]
    ms = [model("a", on=["w1"]), model("b", on=["w1"]), model("q", queue_depth=5)]
    assert run(ws, ms) == []


def test_churn_guard_queued_requests_may_evict_a_recently_used_old_copy():
    cap = 20 * MB
    ws = [worker("w1", copy("a", idle=3, age=3000), copy("b", idle=2, age=3000), capacity=cap)]
    ms = [model("a", on=["w1"]), model("b", on=["w1"]), model("q", queue_depth=5)]
    actions = run(ws, ms)
    assert unloads(actions) == [("a", "w1", "space")]
    assert loads(actions) == [("q", "w1", "queued-requests")]


def test_no_cascade_a_model_evicted_for_space_does_not_evict_another_to_come_back():
    cap = 20 * MB
    ws = [
        worker("w1", copy("x", idle=5000), copy("y", idle=6000), capacity=cap),
        worker("w2", copy("z", idle=7000), copy("u", idle=8000), capacity=cap),
    ]
    ms = [model(m, on=[w]) for m, w in [("x", "w1"), ("y", "w1"), ("z", "w2"), ("u", "w2")]]
    # "v" was evicted for space 20 s ago; worth far more than any copy, it still may not evict
    # another to come back within the churn window (only free space would do)
    ms.append(model("v", last_used=NOW - 25, score=5.0))
    hist = [PastAction(time=NOW - 20, op="unload", model_id="v", worker="w1", reason="space")]
    assert run(ws, ms, history=hist) == []
    # without the history it would be loaded back
    assert loads(run(ws, ms)) == [("v", "w2", "proactive")]
    assert unloads(run(ws, ms)) == [("u", "w2", "space")]


def test_no_cascade_victims_are_not_loaded_back_in_the_same_run():
    cap = 20 * MB
    ws = [worker("w1", copy("a", idle=7000), copy("b", idle=9000), capacity=cap), worker("w2", capacity=0)]
    ms = [model("a", on=["w1"]), model("b", on=["w1"]), model("q", queue_depth=1)]
    actions = run(ws, ms)
    assert unloads(actions) == [("b", "w1", "space")]
    assert [m for m, _, _ in loads(actions)] == ["q"]


def test_eviction_budget_per_run_is_respected():
    s = PlannerSettings(default_model_size_bytes=10 * MB, max_evictions_per_tick=2, churn_age_s=60)
    ws = [worker(f"w{i}", copy(f"a{i}", idle=5000), capacity=10 * MB) for i in range(5)]
    ms = [model(f"a{i}", on=[f"w{i}"]) for i in range(5)] + [model(f"q{i}", queue_depth=1) for i in range(5)]
    assert len(unloads(run(ws, ms, settings=s))) == 2


def test_a_pending_load_from_the_last_run_is_not_sent_again():
    ws = [worker("w1"), worker("w2")]
    ms = [model("q", queue_depth=4)]
    first = loads(run(ws, ms))
    assert len(first) == 1
    _, w, _ = first[0]
    hist = [PastAction(time=NOW - 2, op="load", model_id="q", worker=w, reason="queued-requests")]
    assert run(ws, ms, history=hist, now=NOW) == []
    # once the pending window is over (the command was lost) it is placed again
    assert len(loads(run(ws, ms, history=hist, now=NOW + S.pending_action_ttl_s + 1))) == 1


def test_a_pending_unload_is_not_counted_as_a_copy_and_not_freed_early():
    cap = 20 * MB
    ws = [worker("w1", copy("a", idle=5000), copy("b", idle=6000), capacity=cap)]
    hist = [PastAction(time=NOW - 1, op="unload", model_id="b", worker="w1", reason="idle")]
    ms = [model("a", on=["w1"]), model("b", on=["w1"]), model("q", queue_depth=1)]
    actions = run(ws, ms, history=hist)
    # b is on its way out but its bytes still count: q needs another eviction, of a
    assert unloads(actions) == [("a", "w1", "space")]


# ----------------------------------------------------------------------------- failures (docs/scheduler.md)


def test_failure_records_expire_and_are_cleared():
    f_old = FailureView(time=NOW - 400, error="old", raw="r1")
    f_new = FailureView(time=NOW - 10, error="new", raw="r2")
    ms = [model("m", failures={"w1": f_old, "w2": f_new})]
    actions = run([worker("w1"), worker("w2")], ms)
    assert of(actions, ClearFailure) == [ClearFailure("m", "w1", "r1")]


def test_a_failed_model_is_retried_once_elsewhere_not_on_the_failed_worker():
    ms = [model("m", queue_depth=3, failures={"w1": FailureView(time=NOW - 5, error="boom")})]
    assert loads(run([worker("w1"), worker("w2"), worker("w3")], ms)) == [("m", "w2", "queued-requests")]
    # a pinned model wanting 3 copies still gets only one retry at a time
    ms = [model("p", min_copies=3, failures={"w1": FailureView(time=NOW - 5, error="boom")})]
    assert len(loads(run([worker("w1"), worker("w2"), worker("w3"), worker("w4")], ms))) == 1


def test_fail_fast_after_three_recent_failures_until_they_expire():
    fails = {w: FailureView(time=NOW - 30, error="boom") for w in ("w1", "w2", "w3")}
    ws = [worker("w1"), worker("w2"), worker("w3"), worker("w4")]
    assert run(ws, [model("m", queue_depth=9, min_copies=1, failures=fails)]) == []
    later = run(ws, [model("m", queue_depth=9, min_copies=1, failures=fails)], now=NOW + S.load_failure_expiry_s)
    assert len(of(later, ClearFailure)) == 3
    assert len(loads(later)) == 1


# ----------------------------------------------------------------------------- dead workers (docs/scheduler.md)


def test_dead_workers_are_forgotten_and_their_copy_records_dropped():
    ws = [worker("dead", alive=False), worker("w2", copy("b"))]
    ms = [model("a", on=["dead"]), model("b", on=["w2", "gone-long-ago"])]
    actions = run(ws, ms)
    assert of(actions, ForgetWorker) == [ForgetWorker("dead")]
    assert sorted((a.model_id, a.worker, a.reason) for a in of(actions, DropCopy)) == [
        ("a", "dead", "dead-worker"), ("b", "gone-long-ago", "dead-worker"),
    ]  # fmt: skip


def test_a_dead_workers_queued_model_is_placed_elsewhere_at_once():
    ws = [worker("dead", alive=False), worker("w2")]
    ms = [model("a", on=["dead"], queue_depth=7, last_used=NOW - 1)]
    assert loads(run(ws, ms)) == [("a", "w2", "queued-requests")]


def test_a_dead_workers_recently_used_models_are_reloaded_proactively():
    ws = [worker("dead", alive=False), worker("w2")]
    ms = [model("a", on=["dead"], last_used=NOW - 5), model("b", on=["dead"], last_used=NOW - 50_000)]
    placed = loads(run(ws, ms))
    assert placed[0] == ("a", "w2", "proactive")


def test_stale_loading_records_on_live_workers_are_dropped():
    stale = RegisteredModel(model_id="m", copies={"w1": RegistryCopy(state="LOADING", since=NOW - 100, raw="x")})
    fresh = RegisteredModel(model_id="n", copies={"w1": RegistryCopy(state="LOADING", since=NOW - 5, raw="y")})
    actions = run([worker("w1")], [stale, fresh])
    assert of(actions, DropCopy) == [DropCopy("m", "w1", "stale", "x")]


def test_a_loaded_copy_missing_from_the_registry_is_reasserted():
    ws = [worker("w1", copy("m", age=100))]
    assert loads(run(ws, [RegisteredModel(model_id="m")])) == [("m", "w1", "reassert")]


def test_copies_of_unregistered_models_are_unloaded():
    assert unloads(run([worker("w1", copy("ghost"))], [])) == [("ghost", "w1", "unregistered")]


# ----------------------------------------------------------------------------- drain (docs/scheduler.md)


def test_a_draining_workers_recent_models_are_loaded_elsewhere_most_recent_first():
    s = PlannerSettings(default_model_size_bytes=10 * MB, max_loads_per_tick=2)
    ws = [
        worker("d", copy("a", idle=100), copy("b", idle=10), copy("c", idle=99_999), shutting_down=True),
        worker("w2"),
    ]
    ms = [model("a", on=["d"]), model("b", on=["d"]), model("c", on=["d"])]
    placed = loads(run(ws, ms, settings=s))
    assert placed == [("b", "w2", "drain"), ("a", "w2", "drain")]


def test_drain_skips_models_with_another_copy_and_evicts_colder_copies_for_the_rest():
    cap = 20 * MB
    ws = [
        worker("d", copy("a", idle=100), copy("b", idle=10), shutting_down=True),
        worker("w2", copy("b", idle=10), copy("old", idle=50_000), capacity=cap),
    ]
    ms = [model("a", on=["d"]), model("b", on=["d", "w2"]), model("old", on=["w2"])]
    actions = run(ws, ms)
    assert unloads(actions) == [("old", "w2", "space")]
    assert loads(actions) == [("a", "w2", "drain")]


def test_drain_does_not_evict_models_used_more_recently():
    cap = 10 * MB
    ws = [worker("d", copy("a", idle=5000), shutting_down=True), worker("w2", copy("z", idle=100), capacity=cap)]
    assert run(ws, [model("a", on=["d"]), model("z", on=["w2"])]) == []


# ----------------------------------------------------------------------------- proactive loading (docs/scheduler.md)


def test_proactive_loading_fills_free_space_most_valuable_first_up_to_the_fill_fraction():
    s = PlannerSettings(default_model_size_bytes=10 * MB, proactive_fill_fraction=0.5, max_loads_per_worker=100)
    ms = [model(f"m{i}", last_used=NOW - 100 * i) for i in range(10)]
    ms[7].score = 1.0  # the most used over the long run comes first, then the most recent
    placed = loads(run([worker("w1")], ms, settings=s))
    assert [m for m, _, _ in placed] == ["m7", "m0", "m1", "m2", "m3"]


def test_never_used_models_are_not_loaded_proactively():
    assert run([worker("w1")], [model("m")]) == []


def test_proactive_swap_replaces_only_copies_worth_far_less():
    cap = 10 * MB
    ws = [worker("w1", copy("low", idle=100), capacity=cap)]
    # "top" (0.5 req/s over the long run) is worth more than twice "low" (0.1): swapped in
    ms = [model("low", on=["w1"], score=0.1), model("top", last_used=NOW - 500, score=0.5)]
    actions = run(ws, ms)
    assert unloads(actions) == [("low", "w1", "space")]
    assert loads(actions) == [("top", "w1", "proactive")]
    # worth more, but not twice as much: no swap (two similar models never take turns)
    assert run(ws, [model("low", on=["w1"], score=0.3), model("top", last_used=NOW - 500, score=0.5)]) == []
    # unknown value (no score): only free space, never a swap
    assert run(ws, [model("low", on=["w1"], score=0.1), model("top", last_used=NOW - 5)]) == []
    # a copy used within the churn window is never swapped out
    ws = [worker("w1", copy("low", idle=10), capacity=cap)]
    assert run(ws, [model("low", on=["w1"], score=0.1), model("top", last_used=NOW - 500, score=0.5)]) == []


def test_proactive_swap_happens_only_on_the_models_rendezvous_home():
    """A full pool: the cold path would load "top" on its rendezvous home, so the planner
    swaps it in there (and not on the worker with the cheapest victim), or not at all."""
    from mesh.policy.placement import affinity

    cap = 10 * MB
    names = ["w1", "w2", "w3"]
    home = max(names, key=lambda n: (affinity("top", n), n))
    others = [n for n in names if n != home]
    # the home's copy is worth the most of the three, yet still far less than "top"
    ws = [worker(n, copy(f"low-{n}", idle=100), capacity=cap) for n in names]
    scores = {home: 0.2, others[0]: 0.01, others[1]: 0.05}
    ms = [model(f"low-{n}", on=[n], score=scores[n]) for n in names]
    ms.append(model("top", last_used=NOW - 500, score=1.0))
    actions = run(ws, ms)
    assert loads(actions) == [("top", home, "proactive")]
    assert unloads(actions) == [(f"low-{home}", home, "space")]
    # the home's copy is worth more than half of "top": no swap anywhere
    scores[home] = 0.6
    ms = [model(f"low-{n}", on=[n], score=scores[n]) for n in names]
    ms.append(model("top", last_used=NOW - 500, score=1.0))
    assert run(ws, ms) == []


def test_victims_are_chosen_by_usage_score_then_recency():
    cap = 30 * MB
    ws = [worker("w1", copy("freq", idle=4000), copy("rare", idle=100), copy("mid", idle=2000), capacity=cap)]
    ms = [model("freq", on=["w1"], score=2.0), model("rare", on=["w1"], score=0.01),
          model("mid", on=["w1"], score=0.01), model("q", queue_depth=1)]  # fmt: skip
    # "freq" was used longest ago but is worth the most; of the two rare ones the older goes
    assert unloads(run(ws, ms)) == [("mid", "w1", "space")]


def test_second_copy_for_a_regularly_used_model_only_into_free_space():
    ws = [worker("w1", copy("m", idle=5, rate=0.5, age=1000)), worker("w2")]
    assert loads(run(ws, [model("m", on=["w1"])])) == [("m", "w2", "second-copy")]
    young = [worker("w1", copy("m", idle=5, rate=0.5, age=100)), worker("w2")]
    assert run(young, [model("m", on=["w1"])]) == []
    full = [worker("w1", copy("m", idle=5, rate=0.5, age=1000)), worker("w2", extra_used=95 * MB)]
    assert run(full, [model("m", on=["w1"]), ]) == []


# ----------------------------------------------------------------------------- scale


def test_a_thousand_workers_and_a_hundred_thousand_models_plan_quickly():
    """Not a timing assertion (the benchmark reports the time): it must simply finish and
    place what the rules say at that size."""
    from mesh.tools.simulator import synthetic_cluster

    cluster = synthetic_cluster(n_workers=1000, n_models=100_000, seed=3, now=NOW)
    t0 = time.perf_counter()
    actions = plan(cluster, PlannerSettings(), NOW)
    elapsed = time.perf_counter() - t0
    assert any(isinstance(a, Load) and a.reason == "queued-requests" for a in actions)
    assert any(isinstance(a, ForgetWorker) for a in actions)
    print(f"plan() at 1000 x 100000: {elapsed:.3f}s, {len(actions)} actions")


def test_copies_of_retiring_models_are_left_to_their_drain():
    cluster = ClusterState(workers=[worker("w1", copy("old"))], models=[], retiring={"old"})
    assert plan(cluster, S, NOW) == []


def test_a_load_placed_by_the_cold_path_counts_as_in_progress():
    # the producer's cold path recorded a LOADING copy on w1 and sent the command; w1's
    # heartbeat does not show it yet: nobody places a second one (not orphan, not proactive)
    placed = RegisteredModel(model_id="m", queue_depth=3, last_used=NOW - 1,
                             copies={"w1": RegistryCopy(state="LOADING", since=NOW - 1, raw="r")})  # fmt: skip
    assert run([worker("w1"), worker("w2")], [placed]) == []
    idle = RegisteredModel(model_id="m", last_used=NOW - 1,
                           copies={"w1": RegistryCopy(state="LOADING", since=NOW - 1, raw="r")})  # fmt: skip
    assert run([worker("w1"), worker("w2")], [idle]) == []


def test_records_from_before_a_worker_restarted_are_stale_at_once():
    ws = [worker("w1"), worker("w2")]
    ws[0].started_at = NOW - 5  # restarted under the same name, its cache is empty
    mv = RegisteredModel(model_id="m", queue_depth=2,
                         copies={"w1": RegistryCopy(state="LOADED", since=NOW - 20, raw="old")})  # fmt: skip
    actions = run(ws, [mv])
    assert of(actions, DropCopy) == [DropCopy("m", "w1", "stale", "old")]
    assert [m for m, _, r in loads(actions)] == ["m"]  # its queued requests get a real copy


def test_loads_in_progress_count_against_the_per_worker_budget():
    s = PlannerSettings(default_model_size_bytes=10 * MB, max_loads_per_worker=2)
    busy = worker("w1", loading=["x", "y"], capacity=1000 * MB)
    assert loads(run([busy, worker("w2", capacity=20 * MB)], [model("q", queue_depth=1)], settings=s)) == [
        ("q", "w2", "queued-requests")
    ]


def _labelled_cluster(seed: int) -> ClusterState:
    """A small full cluster with pools, several copies, pending unloads and queued models:
    evictions in and out of pools, workers touched before the evict heap is built."""
    import random

    rng = random.Random(seed)
    ws = []
    for i in range(12):
        labels = {"env": "a"} if i % 6 == 0 else {}  # a small pool: searched apart
        copies = [copy(f"m{(i * 10 + j + (13 if j == 9 else 0)) % 120:03d}", idle=rng.uniform(0, 3000), age=rng.uniform(0, 6000),
                       rate=rng.choice([0.0, 0.0, 1.0, 20.0])) for j in range(10)]  # fmt: skip
        w = worker(f"w{i:02d}", *copies, capacity=rng.choice([100, 100, 105, 120]) * MB, shutting_down=i == 5)
        w.labels = labels
        ws.append(w)
    models = []
    for k in range(120):
        mid = f"m{k:03d}"
        on = [w.name for w in ws if mid in w.models]
        leaving = k % 11 == 0  # an unload sent by the last run (the history below): worth least
        models.append(model(mid, on=on, queue_depth=rng.choice([0, 0, 0, 3]), score=0.0 if leaving else rng.uniform(0, 5),
                            last_used=NOW - rng.uniform(0, 4000), min_copies=rng.choice([None] * 6 + [1]),
                            required_labels={"env": "a"} if k % 9 == 0 else None))  # fmt: skip
    # the pool's queued models first (most queued): evictions in the pool before the shared heap
    models += [model(f"q{k}", queue_depth=9 if k % 3 == 0 else 5, required_labels={"env": "a"} if k % 3 == 0 else None)
               for k in range(30)]  # fmt: skip
    history = [PastAction(NOW - 3, "unload", f"m{k:03d}", f"w{k // 10:02d}", "space") for k in range(0, 120, 11)]
    return ClusterState(workers=ws, models=models, history=history)


@pytest.mark.parametrize("seed", range(6))
def test_the_evict_heaps_first_keys_are_each_workers_rough_head(seed, monkeypatch):
    """`_rough_heads` takes the quiet copies' part from `_each_model` and looks up only the
    built models' copies: it gives what `_evict_head(w, rough=True)` gives for every worker."""
    from mesh.policy import planner as p

    checked = []

    def rough_heads(self):
        heads = original(self)
        assert heads == [(self._evict_head(w, rough=True), w.version, w.name) for w in self.usable]
        checked.append(len(heads))
        return heads

    original = p._Plan._rough_heads
    monkeypatch.setattr(p._Plan, "_rough_heads", rough_heads)
    plan(_labelled_cluster(seed), PlannerSettings(default_model_size_bytes=10 * MB, churn_age_s=60), NOW)
    assert checked  # the heap was built


def test_once_the_evictions_are_spent_no_need_searches_for_victims(monkeypatch):
    from mesh.policy import planner as p

    calls = []
    search = p._Plan._pick_evict
    monkeypatch.setattr(p._Plan, "_pick_evict", lambda self, *a, **k: calls.append(1) or search(self, *a, **k))
    full = [worker(f"w{i}", *(copy(f"c{i}-{j}") for j in range(10))) for i in range(3)]
    models = [model(f"c{i}-{j}", on=[f"w{i}"]) for i in range(3) for j in range(10)]
    queued = [model(f"q{k}", queue_depth=1) for k in range(20)]
    actions = run(full, models + queued, settings=PlannerSettings(default_model_size_bytes=10 * MB, max_evictions_per_tick=2))
    assert len(of(actions, Unload)) == 2 and len(loads(actions)) == 2
    assert len(calls) == 2  # not one per queued model
