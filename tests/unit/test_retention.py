"""The retention policy (workers/retention.py): which loaded model a full worker evicts first."""

from __future__ import annotations

import math

import pytest

from workers.retention import Candidate, UsageMeter, deferrable, eviction_key, first_victim, make_room


def test_usage_evicts_the_least_requested_and_lru_the_least_recent():
    hot = Candidate("hot", score=50.0, last_used=1.0)  # used most, but longest ago
    once = Candidate("once", score=1.0, last_used=2.0)
    assert first_victim([hot, once], "usage") == "once"
    assert first_victim([hot, once], "lru") == "hot"


def test_usage_breaks_ties_by_last_use():
    a, b = Candidate("a", 3.0, last_used=7.0), Candidate("b", 3.0, last_used=5.0)
    assert first_victim([a, b], "usage") == "b"
    assert eviction_key(a, "usage") == (False, 3.0, 7.0)


def test_no_candidate_no_victim():
    assert first_victim([], "usage") is None
    assert deferrable([], "usage") is None


def test_a_fresh_copy_the_policy_would_evict_but_for_its_freshness_is_deferrable():
    hot = Candidate("hot", 20.0, last_used=1.0)
    fresh = Candidate("fresh", 0.0, last_used=5.0, fresh=True)
    assert first_victim([hot, fresh], "usage") == "hot"  # freshness alone would evict hot
    assert deferrable([hot, fresh], "usage") == "fresh"  # so the worker holds both for now
    # a served copy ranks lowest: evict it, nothing to defer
    once = Candidate("once", 1.0, last_used=2.0)
    assert deferrable([hot, once, Candidate("fresh", 3.0, 5.0, fresh=True)], "usage") is None
    assert first_victim([hot, once, Candidate("fresh", 3.0, 5.0, fresh=True)], "usage") == "once"
    # lru ranks by last use: a fresh copy (used at its load) defers to an older one
    assert deferrable([Candidate("old", 9.0, 1.0), Candidate("new", 0.0, 5.0, fresh=True)], "lru") is None
    assert deferrable([Candidate("old", 9.0, 9.0), Candidate("new", 0.0, 5.0, fresh=True)], "lru") == "new"


def _room(candidates, needed=10, overcommit=0, capacity=30):
    used = sum(c.size for c in candidates)
    return make_room(candidates, "usage", used=used, needed=needed, capacity=capacity, overcommit=overcommit)


def test_make_room_evicts_by_the_policy_until_the_load_fits():
    a, b, c = (Candidate(m, score, 0.0, size=10) for m, score in (("a", 5.0), ("b", 1.0), ("c", 3.0)))
    assert _room([a, b, c]) == ["b"]
    assert _room([a, b, c], needed=20) == ["b", "c"]
    assert _room([a, b], needed=10) == []  # it fits
    big = Candidate("big", 0.5, 0.0, size=25)
    assert _room([a, big], needed=10, capacity=30) == ["big"]  # one big victim frees enough


def test_make_room_holds_fresh_copies_above_capacity_as_far_as_the_overcommit_allows():
    hot, warm = Candidate("hot", 20.0, 1.0, size=10), Candidate("warm", 8.0, 2.0, size=10)
    f1 = Candidate("f1", 0.0, 5.0, fresh=True, size=10)
    f2 = Candidate("f2", 1.0, 6.0, fresh=True, size=10)
    # without room above capacity, freshness protects the fresh copies: the used ones go
    assert _room([hot, warm, f1]) == ["warm"]
    assert _room([hot, warm, f1, f2], needed=10, capacity=40) == ["warm"]
    # with room for one fresh copy above capacity: nothing is evicted for one load
    assert _room([hot, warm, f1], overcommit=10) == []
    # two fresh copies below the used ones, room above capacity for one: the next victim goes
    assert _room([hot, warm, f1, f2], needed=20, capacity=40, overcommit=10) == ["warm"]
    assert _room([hot, warm, f1, f2], needed=20, capacity=40, overcommit=20) == []
    # a fresh copy larger than the overcommit is not held: the used one goes
    assert _room([hot, Candidate("f", 0.0, 5.0, fresh=True, size=15)], needed=10, capacity=25, overcommit=10) == ["hot"]
    # a used copy below every fresh one is evicted as before, overcommit or not
    once = Candidate("once", 0.5, 3.0, size=10)
    assert _room([hot, once, f2], overcommit=10) == ["once"]
    assert _room([hot, once, f1], overcommit=10) == []  # f1 (count 0) ranks below it
    # loads in progress reserve 25 or 35 more: within capacity + overcommit both copies stay;
    # beyond it, with nothing else to evict, they go as they would without the allowance
    assert make_room([f1, f2], "usage", used=20 + 25, needed=10, capacity=40, overcommit=20) == []
    assert make_room([f1, f2], "usage", used=20 + 35, needed=10, capacity=40, overcommit=20) == ["f1", "f2"]


def test_meter_counts_requests_and_decays_them():
    meter = UsageMeter(decay_s=10.0)
    meter.record("m", 4, now=100.0)
    meter.record("m", 1, now=100.0)
    assert meter.score("m", 100.0) == pytest.approx(5.0)
    assert meter.score("m", 110.0) == pytest.approx(5.0 / math.e)
    meter.record("m", 1, now=110.0)  # decays what it had, then adds
    assert meter.score("m", 110.0) == pytest.approx(5.0 / math.e + 1.0)
    assert meter.score("never", 110.0) == 0.0


def test_meter_history_survives_until_forgotten_and_is_bounded():
    meter = UsageMeter(decay_s=60.0, max_models=3)
    for i, m in enumerate(["a", "b", "c"]):
        meter.record(m, 10 + i, now=0.0)
    assert meter.score("a", 0.0) == 10.0
    meter.forget("a")
    assert meter.score("a", 0.0) == 0.0
    for m in ["d", "e"]:
        meter.record(m, 1, now=0.0)
    assert len(meter) == 3  # the least recently counted went first
    assert meter.score("b", 0.0) == 0.0 and meter.score("e", 0.0) == 1.0


def test_meter_rejects_a_non_positive_decay():
    with pytest.raises(ValueError):
        UsageMeter(0.0)


def test_usage_makes_fewer_misses_than_lru_on_a_zipf_stream():
    """The reason usage is the default: on a skewed stream, a cache of 20 ordered by decayed
    count misses clearly less often than the same cache ordered by last use."""
    import numpy as np

    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, 201)
    stream = rng.choice(200, size=6000, p=p / p.sum()).tolist()

    def misses(policy: str) -> int:
        meter, cache, out = UsageMeter(decay_s=2000.0), {}, 0
        for t, m in enumerate(stream):
            if m not in cache:
                out += t >= 1000
                if len(cache) == 20:
                    victim = first_victim(
                        (Candidate(str(k), meter.score(str(k), t), used) for k, used in cache.items()), policy
                    )
                    del cache[int(victim)]
            cache[m] = t
            meter.record(str(m), 1, t)
        return out

    usage, lru = misses("usage"), misses("lru")
    assert usage < 0.85 * lru, (usage, lru)


def test_a_fresh_copy_goes_last_under_both_policies():
    """A copy loaded and not yet used must not be the next load's victim (its requests are
    still on their way to it), however low its count."""
    fresh = Candidate("fresh", score=0.0, last_used=1.0, fresh=True)
    old = Candidate("old", score=9.0, last_used=9.0)
    assert first_victim([fresh, old], "usage") == "old"
    assert first_victim([fresh, old], "lru") == "old"
    assert first_victim([fresh], "usage") == "fresh"  # still evictable when nothing else is
