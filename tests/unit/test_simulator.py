"""The scheduler simulation, small: deterministic, and the planner beats LRU alone on cold loads."""

from __future__ import annotations

import numpy as np

from mesh.tools.simulator import ClusterSim, SimConfig, belady_result, make_trace, report, run_all


def small(**kw) -> SimConfig:
    base = dict(
        n_workers=20, n_models=1000, slots_per_worker=20, rps=40, duration_s=800, warmup_s=100,
        hot_model=777, hot_start_s=200, hot_end_s=400, hot_share=0.5, death_at_s=450, dead_worker=3,
        roll_start_s=550, roll_gap_s=10.0, copy_rps=6.0, seed=7,
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def test_planner_beats_lru_only_and_stays_above_beladys_bound():
    cfg = small()
    lru, planned, belady = run_all(cfg)
    assert lru.requests == planned.requests == belady.requests > 20_000
    assert planned.cold_loads < lru.cold_loads
    assert planned.waits < lru.waits
    assert belady.cold_loads <= planned.cold_loads
    # the hot model got more copies under the planner, and gave them back after cooling
    assert lru.hot_max_copies == 1 and planned.hot_max_copies >= 2
    assert planned.hot_backlog_max < lru.hot_backlog_max
    text = report(cfg, [lru, planned, belady])
    assert "rolling restart" in text and "planner" in text


def test_simulation_is_deterministic():
    cfg = small(duration_s=300, warmup_s=50, hot_start_s=100, hot_end_s=150, death_at_s=200,
                roll_start_s=250, roll_gap_s=2.0)  # fmt: skip
    a, b = make_trace(cfg), make_trace(cfg)
    assert np.array_equal(a.models, b.models)
    r1 = ClusterSim(cfg, a, use_planner=True).run()
    r2 = ClusterSim(cfg, b, use_planner=True).run()
    assert (r1.cold_loads, r1.waits, r1.planner_loads, r1.planner_unloads) == (
        r2.cold_loads, r2.waits, r2.planner_loads, r2.planner_unloads,
    )  # fmt: skip
    assert belady_result(cfg, a).cold_loads == belady_result(cfg, b).cold_loads
