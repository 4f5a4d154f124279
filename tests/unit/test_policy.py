"""Pure policy: placement, status, effective config, ids and key names."""

from __future__ import annotations

import pytest

from mesh.errors import InvalidId
from mesh.models import BatchingConfig, CopyInfo, CopyState, FailedCopy, ModelInfo, ModelState, WorkerState
from mesh.policy.placement import SPILL_BACKLOG, choose_worker, fresh_failures
from mesh.policy.precedence import effective_config
from mesh.policy.status import model_status
from mesh.protocol.ids import validate_id
from mesh.protocol.keys import Keys
from mesh.settings import MeshSettings


def worker(name, capacity=100, used=0, models=0, shutting_down=False):
    from mesh.models import LoadedModel

    return WorkerState(
        name=name, host="h", pid=1, capacity_bytes=capacity, used_bytes=used,
        models=[LoadedModel(model_id=f"m{i}", size_bytes=1, last_used=0, loaded_at=0) for i in range(models)],
        shutting_down=shutting_down, started_at=0, updated_at=0,
    )


def test_choose_worker_prefers_room_then_free_bytes_then_fewest_models():
    ws = [worker("a", used=90), worker("b", used=10, models=3), worker("c", used=10, models=1)]
    assert choose_worker(ws, size_hint=20) == "c"  # b and c have room and equal free bytes
    ws.append(worker("d", used=5, models=9))
    assert choose_worker(ws, size_hint=20) == "d"  # the most free bytes wins before model count
    assert choose_worker(ws, exclude=["b", "c", "d"]) == "a"


def test_when_nothing_fits_each_model_has_a_stable_home_and_homes_spread():
    ws = [worker(f"w{i}", capacity=100, used=100, models=5) for i in range(4)]
    homes = {m: choose_worker(ws, model_id=m, size_hint=10) for m in (f"m{i}" for i in range(400))}
    assert homes == {m: choose_worker(list(reversed(ws)), model_id=m, size_hint=10) for m in homes}
    counts = [list(homes.values()).count(w.name) for w in ws]
    assert min(counts) > 60, counts  # ~100 each: no worker takes every eviction
    # a model's home only moves when its home leaves
    gone = homes["m1"]
    rest = [w for w in ws if w.name != gone]
    moved = sum(1 for m, h in homes.items() if h != gone and choose_worker(rest, model_id=m, size_hint=10) != h)
    assert moved == 0


def test_a_full_home_with_a_long_line_of_loads_is_skipped():
    def full(name, loading):
        w = worker(name, used=100, models=5)
        return w.model_copy(update={"loading": [f"l{i}" for i in range(loading)]})

    ws = [full("a", 0), full("b", 0)]
    homes = {m: choose_worker(ws, model_id=m, size_hint=10) for m in (f"m{i}" for i in range(40))}
    busy = homes["m0"]
    other = "b" if busy == "a" else "a"
    lines = {busy: SPILL_BACKLOG - 1, other: 0}
    ws = [full(n, lines[n]) for n in ("a", "b")]
    assert choose_worker(ws, model_id="m0", size_hint=10) == busy  # a short line: still home
    lines[busy] = SPILL_BACKLOG
    ws = [full(n, lines[n]) for n in ("a", "b")]
    assert choose_worker(ws, model_id="m0", size_hint=10) == other
    # models whose home is the idle worker stay there
    assert all(choose_worker(ws, model_id=m, size_hint=10) == other for m, h in homes.items() if h == other)


def test_live_lines_of_loads_outrank_the_heartbeats_list():
    ws = [worker("a", used=100, models=5), worker("b", used=100, models=5)]
    busy = choose_worker(ws, model_id="m0", size_hint=10)
    other = "b" if busy == "a" else "a"
    # the heartbeat says nothing is loading; the live lines say the home has a long one
    assert choose_worker(ws, model_id="m0", size_hint=10, backlog={busy: SPILL_BACKLOG}) == other
    assert choose_worker(ws, model_id="m0", size_hint=10, backlog={busy: SPILL_BACKLOG - 1}) == busy
    # and a stale heartbeat list of loads counts for nothing once the live figures are there
    stale = [w.model_copy(update={"loading": ["x"] * 9}) if w.name == busy else w for w in ws]
    assert choose_worker(stale, model_id="m0", size_hint=10, backlog={}) == busy


def test_choose_worker_skips_failed_excluded_and_draining_workers():
    ws = [worker("a"), worker("b", shutting_down=True), worker("c")]
    assert choose_worker(ws, failed_on=["a"]) == "c"
    assert choose_worker(ws, failed_on=["a", "c"]) is None
    assert choose_worker([]) is None


def test_fresh_failures_expire_and_come_newest_first():
    fs = [FailedCopy(worker="a", error="old", time=0), FailedCopy(worker="b", error="new", time=95),
          FailedCopy(worker="c", error="mid", time=80)]
    assert [f.error for f in fresh_failures(fs, now=100, expiry_s=30)] == ["new", "mid"]


def status(**kw):
    base = dict(registered=True, copies=[], failures=[], live_workers=set(), load_claimed=False,
                now=100.0, load_failure_expiry_s=30.0)
    base.update(kw)
    return model_status("m", **base)


def test_status_states():
    loaded = CopyInfo(worker="a", state=CopyState.LOADED, since=1)
    loading = CopyInfo(worker="b", state=CopyState.LOADING, since=2)
    assert status(registered=False).state is ModelState.NOT_FOUND
    assert status().state is ModelState.NOT_LOADED
    assert status(load_claimed=True).state is ModelState.LOADING
    assert status(copies=[loading], live_workers={"b"}).state is ModelState.LOADING
    st = status(copies=[loaded, loading], live_workers={"a", "b"})
    assert st.state is ModelState.LOADED and [c.worker for c in st.copies] == ["b", "a"]
    # copies of dead workers do not count
    assert status(copies=[loaded], live_workers=set()).state is ModelState.NOT_LOADED
    failed = FailedCopy(worker="a", error="boom", time=90)
    st = status(failures=[failed])
    assert st.state is ModelState.LOADING_FAILED and st.errors == ["boom"]
    assert status(failures=[FailedCopy(worker="a", error="boom", time=10)]).state is ModelState.NOT_LOADED
    assert ModelState.LOADING_FAILED.serving_state == "FailedToLoad"


def test_effective_config_precedence_and_sources(monkeypatch):
    info = ModelInfo(runtime="sklearn", uri="file:///m", batching=BatchingConfig(max_batch_size=8))
    monkeypatch.setenv("MESH_MAX_BATCH_DELAY_MS", "7")
    cfg = effective_config("m", info, MeshSettings())
    assert cfg.values["max_batch_size"].model_dump() == {"value": 8, "source": "api"}
    assert cfg.values["max_batch_delay_ms"].model_dump() == {"value": 7.0, "source": "global"}
    cfg = effective_config("m", ModelInfo(runtime="sklearn", uri="file:///m"), MeshSettings(),
                           manifest=BatchingConfig(max_batch_size=4))
    assert cfg.values["max_batch_size"].model_dump() == {"value": 4, "source": "manifest"}
    monkeypatch.delenv("MESH_MAX_BATCH_DELAY_MS")
    cfg = effective_config("m", ModelInfo(runtime="sklearn", uri="file:///m"), MeshSettings())
    assert cfg.values["max_batch_delay_ms"].source == "default"


@pytest.mark.parametrize("good", ["es_1", "name__isvc-3642375d03", "digits@3", "w1@host.example", "a", "x" * 512,
                                  "a b", "a/b", "a*", "a?", "a[1]", "é", "a\nb", "modèle", "模型", "🤖", "é" * 256])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 513, "é" * 257, "a\x00", "\ud800", "a\udfffb", None, 3, b"a"])
def test_invalid_ids(bad):
    with pytest.raises(InvalidId):
        validate_id(bad)


def test_keys_live_under_the_prefix():
    k = Keys("pfx")
    assert k.model_queue("es_1") == "pfx.model.es_1"
    assert k.model_from_queue("pfx.model.es_1") == "es_1"
    assert k.model_from_queue("other.model.es_1") is None
    assert k.queue_list_keys("pfx.model.m", [0, 5]) == ["pfx:pfx.model.m", "pfx:pfx.model.m\x06\x165"]
    for key in (k.models, k.vmodels, k.copies("m"), k.failures("m"), k.load_claim("m"), k.workers, k.worker("w")):
        assert key.startswith("pfx:")
    with pytest.raises(InvalidId):
        Keys("bad prefix")


def test_no_prefix_can_own_another_meshs_keys():
    # 'a' and 'a:copies' both owned 'a:copies:<model>'; 'a.model' queues sat beside 'a's
    a_keys = Keys("a").copies("m")
    for other in ("a:copies", "a.model", "a:", "x" * 65, ""):
        with pytest.raises(InvalidId, match="prefix"):
            Keys(other)
        with pytest.raises(ValueError, match="prefix"):
            MeshSettings(prefix=other)
    assert a_keys == "a:copies:m"
    assert Keys("team-a_2").models == "team-a_2:models"
