"""A worker's line of loads (workers/manager.py): fetch ahead, load in order, and a load that
hangs or fails takes nothing behind it down with it. Both with the fetch stage on its own
threads (MESH_LOAD_PREFETCH=2, the default) and inline (0)."""

from __future__ import annotations

import shutil

import pytest

from mesh import ModelInfo, ModelLoadFailed, ModelState
from mesh.tools.launcher import wait_for
from tests.faults.helpers import X, slow_info

from .test_foundation import answer, seed_tensor


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_hung_load_times_out_and_the_loads_behind_it_still_answer(
    client, workers, tmp_path, model_dir, svm_path, seed_input, prefetch
):
    # The timeout is every load's, the SVM loads behind the hung one included: 3 s failed
    # them on a machine loaded by parallel runs (a load of ~50 ms took longer than 3 s)
    w = workers("w1", MESH_LOAD_TIMEOUT_S=10, MESH_LOAD_PREFETCH=prefetch)
    gate = tmp_path / "gate"
    gate.touch()
    client.register_model("hung", slow_info(tmp_path, "hung", gate=gate))
    behind = [f"m{i}" for i in range(4)]
    for model_id in behind:
        path = model_dir / f"line{prefetch}_{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))
    try:
        stuck = client.infer(model_id="hung", inputs=[X])
        wait_for(lambda: client.get_model_status("hung").state is ModelState.LOADING, 30,
                 what="the hung load to start")  # fmt: skip
        queued = {m: client.infer(model_id=m, inputs=[seed_tensor(seed_input)]) for m in behind}
        line = client.store.keys.load_line(w.full_name)
        assert client.store.r.zcard(line) == 1 + len(behind)  # each waits its turn in the line
        with pytest.raises(ModelLoadFailed, match="timed out"):
            stuck.get(timeout=60)
        for model_id, r in queued.items():
            assert answer(r.get(timeout=60)) == 8, model_id
    finally:
        gate.unlink()
    # every load left the line: the failed one, and the four LOADED ones (a copy answers the
    # requests it held while loading before its LOADED mark reaches Redis)
    wait_for(lambda: client.store.r.zcard(line) == 0, 15, what="the loads to leave the line")
    assert client.get_model_status("hung").state is ModelState.LOADING_FAILED
    (state,) = client.list_workers()
    wait_for(lambda: {m.model_id for m in client.list_workers()[0].models} == set(behind), 15,
             what="the heartbeat to list the loaded models")  # fmt: skip
    assert state.capacity_bytes >= state.used_bytes


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reloads_through_the_line_come_from_their_snapshots(
    client, workers, model_dir, svm_path, seed_input, prefetch
):
    """Three models taking turns on a worker with room for one: each reload restores the
    snapshot bytes the fetch stage read, and answers the same."""
    from workers.runtimes import get_runtime

    info = ModelInfo(runtime="sklearn", uri=f"file://{svm_path}")
    size = get_runtime("sklearn").load(svm_path, info).size_bytes
    w = workers("w1", MESH_WORKER_CAPACITY_BYTES=int(size * 1.5), MESH_LOAD_PREFETCH=prefetch)
    models = ["ra", "rb", "rc"]
    for model_id in models:
        path = model_dir / f"reload{prefetch}_{model_id}.joblib"
        shutil.copy(svm_path, path)
        client.register_model(model_id, ModelInfo(runtime="sklearn", uri=f"file://{path}"))
    for model_id in models:  # first loads, one by one: each writes its snapshot
        assert answer(client.infer(model_id=model_id, inputs=[seed_tensor(seed_input)]).get(timeout=60)) == 8
    # then all at once, twice over: the loads queue in the line, fetched ahead of their turn
    rounds = [client.infer(model_id=m, inputs=[seed_tensor(seed_input)]) for m in models * 2]
    assert [answer(r.get(timeout=60)) for r in rounds] == [8] * len(rounds)
    # (ra's and rb's snapshots were written while the next first loads ran; rc's may be late).
    # A reload's requests are answered before its "loaded ..." line is logged (the held ones
    # are batched while the copy is announced): wait for the lines, do not race them (a
    # clean-clone CI run read the log 4 ms before rb's)
    wait_for(lambda: w.tail(400).count("from its snapshot") >= 2, 30, interval=0.1,
             what="two reloads logged as from their snapshot")  # fmt: skip
