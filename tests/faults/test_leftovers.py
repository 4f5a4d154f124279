"""Nothing is left behind in Redis (docs/reliability.md, the soak's key check at test speed): once models
have come and gone (unregistered, auto-deleted by a vmodel cutover) and their results have
expired, the keys under the prefix are the ones there were before."""

from __future__ import annotations

from mesh.control.vmodels import advance_all
from mesh.tools.launcher import wait_for
from tests.integration.test_foundation import answer, seed_tensor, sklearn_info


def test_models_that_come_and_go_leave_no_keys_behind(client, workers, svm_path, seed_input):
    workers("w1", MESH_RESULT_EXPIRES_S="2")
    r = client.store.r

    def keys() -> set[str]:
        # the stray sweep's lock (workers/strays.py) comes and goes with the sweeps, whatever
        # the models do; the registry's change log (mesh/store/changes.py) is one key per mesh,
        # bounded, that the first registration creates
        found = {k.decode() for k in r.scan_iter(match=f"{client.keys.prefix}[:.]*", count=1000)}
        return found - {client.keys.strays_lock, client.keys.changes}

    # the worker's remote-control queue binding (kombu keeps it, with its deadline, for as long
    # as the worker lives) is declared a moment after the heartbeat that `workers` waits for:
    # taken before it, the snapshot missed it and the run failed as if a model had left it
    control = f"{client.keys.prefix}:_kombu.binding.*pidbox*"
    wait_for(lambda: any(r.scan_iter(match=control, count=1000)), 30, interval=0.05,
             what="the worker's control binding")  # fmt: skip
    before = keys()
    good = [seed_tensor(seed_input)]
    # a model registered, used and unregistered
    client.register_model("m1", sklearn_info(svm_path))
    assert [answer(client.infer(model_id="m1", inputs=good).get(timeout=60)) for _ in range(3)] == [8] * 3
    client.unregister_model("m1")
    # a vmodel whose targets are auto-deleted: one by a cutover, the last with the vmodel
    info = sklearn_info(svm_path)
    client.set_vmodel("v", "v_1", model_info=info, auto_delete_target_model=True)
    assert answer(client.infer(vmodel_id="v", inputs=good).get(timeout=60)) == 8
    client.set_vmodel("v", "v_2", model_info=info, auto_delete_target_model=True, load_now=True, sync=True)
    assert answer(client.infer(vmodel_id="v", inputs=good).get(timeout=60)) == 8
    client.delete_vmodel("v")
    assert client.list_models() == [] and client.list_vmodels() == []

    # results expire (2 s) and the auto-deleted models finish draining (beat's vmodel duty)
    def settled() -> bool:
        advance_all(client.store, client.app)
        return not keys() - before

    try:
        wait_for(settled, 30, interval=0.25, what="the keys to be what they were")
    except TimeoutError:
        raise AssertionError(f"keys left behind: {sorted(keys() - before)}") from None
