"""VModels end to end: the update story of docs/quickstart.md under traffic, blocked transitions, auto-delete, sync,
and a property test of the reference counts under two concurrent clients.

No beat scheduler runs here. Transitions complete through what the issue allows without it:
at once inside set_vmodel when possible, by the worker's copy_loaded event, by a sync
caller, and, where a scheduler tick is needed (unloading drained auto-deleted copies), by
calling `advance_all` from the test, which is exactly what the beat's rebalance run calls.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import MeshClient, ModelInfo
from mesh.errors import FailedPrecondition, MeshError
from mesh.models import CopyInfo, CopyState, ModelState, VModelState, WorkerState
from mesh.tools.launcher import wait_for

from .test_foundation import answer, seed_tensor, sklearn_info


class Traffic:
    """A producer sending requests to a vmodel continuously (a few in flight), from its own
    MeshClient and thread, recording which concrete model answered each request in send order."""

    def __init__(self, redis_url: str, prefix: str, vmodel_id: str, seed_input: list[float]) -> None:
        self.client = MeshClient(redis_url=redis_url, prefix=prefix)
        self.vmodel_id = vmodel_id
        self.inputs = [seed_tensor(seed_input)]
        self.answered: list[str] = []  # model_name per request, in send order
        self.failures: list[str] = []
        self.wrong: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.client.close()

    def count(self, model_id: str) -> int:
        return sum(1 for m in list(self.answered) if m == model_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pending = [self.client.infer(vmodel_id=self.vmodel_id, inputs=self.inputs) for _ in range(4)]
            except Exception as exc:  # a failure to enqueue is a failed request too
                self.failures.append(f"enqueue: {type(exc).__name__}: {exc}")
                continue
            for r in pending:
                try:
                    response = r.get(timeout=60)
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.answered.append(response["model_name"])
                if answer(response) != 8:
                    self.wrong.append(answer(response))


def assert_cut_over_once(answered: list[str], old: str, new: str) -> None:
    """Responses name the old model, then the new one, never back."""
    assert answered and set(answered) <= {old, new}
    first_new = answered.index(new)
    assert first_new > 0, "no request was answered by the old model before the cutover"
    assert all(m == old for m in answered[:first_new])
    assert all(m == new for m in answered[first_new:]), "a request went back to the old model"


def copy_model(src, model_dir, name):
    path = model_dir / f"{name}.joblib"
    shutil.copy(src, path)
    return path


def test_seed_story_es_1_then_es_2_under_continuous_traffic(
    client, workers, redis_url, prefix, svm_path, mlp_path, model_dir, seed_input
):
    workers("w1")
    workers("w2")
    # 1. train and add es_1, and a vmodel es pointing to it
    client.register_model("es_1", sklearn_info(copy_model(svm_path, model_dir, "es_1")))
    st0 = client.set_vmodel("es", "es_1", load_now=True, sync=True, timeout=120)
    assert st0.status is VModelState.DEFINED and st0.active_model_state is ModelState.LOADED
    with Traffic(redis_url, prefix, "es", seed_input) as traffic:
        wait_for(lambda: traffic.count("es_1") >= 8 or traffic.failures, 120, what="traffic on es_1")
        # 2. later, es_2, and set the target of es to it: the active keeps serving meanwhile
        client.register_model("es_2", sklearn_info(copy_model(mlp_path, model_dir, "es_2")))
        st = client.set_vmodel("es", "es_2")
        assert st.target_model_id == "es_2"
        # the worker that loads es_2 completes the transition (its copy_loaded event), no tick needed
        done = wait_for(
            lambda: (s := client.get_vmodel_status("es")).status is VModelState.DEFINED and s,
            120, what="the transition to es_2",
        )  # fmt: skip
        assert done.active_model_id == "es_2" and done.active_model_state is ModelState.LOADED
        # 3. users keep sending to es and are now served by es_2
        wait_for(lambda: traffic.count("es_2") >= 8 or traffic.failures, 120, what="traffic on es_2")
    assert traffic.failures == [] and traffic.wrong == []
    assert_cut_over_once(traffic.answered, "es_1", "es_2")
    # es_1 was registered on its own: it stays registered and usable by its id
    assert client.get_model_status("es_1").state is ModelState.LOADED
    r = client.infer(model_id="es_1", inputs=[seed_tensor(seed_input)]).get(timeout=60)
    assert r["model_name"] == "es_1" and answer(r) == 8
    # and it cannot be unregistered until nothing references it... which is now the case
    client.unregister_model("es_1")
    assert client.get_model_status("es_1").state is ModelState.NOT_FOUND


def test_target_with_missing_file_blocks_and_es_1_keeps_serving(
    client, workers, svm_path, model_dir, seed_input
):
    workers("w1")
    client.set_vmodel(
        "es", "es_1", model_info=sklearn_info(svm_path), auto_delete_target_model=True,
        load_now=True, sync=True, timeout=120,
    )  # fmt: skip
    missing = sklearn_info(model_dir / "es_2-was-never-written.joblib")
    st = client.set_vmodel(
        "es", "es_2", model_info=missing, auto_delete_target_model=True, sync=True, timeout=120
    )
    # sync returns when the transition is blocked by the failed load
    assert st.status is VModelState.TRANSITION_FAILED
    assert st.transition_status == "BlockedByFailedLoad"
    assert (st.active_model_id, st.target_model_id) == ("es_1", "es_2")
    assert st.active_model_serving_state == "Loaded"
    assert st.target_model_serving_state == "FailedToLoad"
    assert st.failed_copies == 1 and "not found" in st.errors[0]
    # es_1 keeps serving every request to es
    results = [client.infer(vmodel_id="es", inputs=[seed_tensor(seed_input)]) for _ in range(5)]
    for r in results:
        response = r.get(timeout=60)
        assert response["model_name"] == "es_1" and answer(response) == 8
    # a scheduler tick changes nothing while the failure records are fresh
    client.vmodels.advance_all()
    assert client.get_vmodel_status("es").status is VModelState.TRANSITION_FAILED
    # retargeting to a good model moves on (and drops the failed target, auto-deleted)
    good = sklearn_info(svm_path)
    client.set_vmodel("es", "es_3", model_info=good, auto_delete_target_model=True, sync=True, timeout=120)
    assert client.get_model_status("es_2").state is ModelState.NOT_FOUND
    assert client.get_vmodel_status("es").active_model_id == "es_3"


def test_deleting_a_referenced_model_fails_with_failed_precondition(client, svm_path):
    client.register_model("es_1", sklearn_info(svm_path))
    client.set_vmodel("es", "es_1")
    with pytest.raises(FailedPrecondition) as err:
        client.unregister_model("es_1")
    assert err.value.code == "FAILED_PRECONDITION"
    assert client.get_model_status("es_1").state is ModelState.NOT_LOADED
    client.delete_vmodel("es")
    client.unregister_model("es_1")


def test_auto_delete_es_1_is_gone_after_the_cutover(
    client, workers, redis_url, prefix, svm_path, mlp_path, seed_input
):
    w = workers("w1")
    client.set_vmodel(
        "es", "es_1", model_info=sklearn_info(svm_path), auto_delete_target_model=True,
        load_now=True, sync=True, timeout=120,
    )  # fmt: skip
    with Traffic(redis_url, prefix, "es", seed_input) as traffic:
        wait_for(lambda: traffic.count("es_1") >= 8 or traffic.failures, 120, what="traffic on es_1")
        client.set_vmodel("es", "es_2", model_info=sklearn_info(mlp_path), auto_delete_target_model=True)
        wait_for(
            lambda: client.get_model_status("es_1").state is ModelState.NOT_FOUND, 120,
            what="es_1 auto-deleted by the cutover",
        )  # fmt: skip
        assert client.get_vmodel_status("es").active_model_id == "es_2"
        wait_for(lambda: traffic.count("es_2") >= 8 or traffic.failures, 120, what="traffic on es_2")
    # requests routed to es_1 just before the switch were still answered by it: none failed
    assert traffic.failures == [] and traffic.wrong == []
    assert_cut_over_once(traffic.answered, "es_1", "es_2")
    assert [m.model_id for m in client.list_models()] == ["es_2"]

    # its copy is unloaded once drained; a scheduler tick does that (called here directly)
    def drained() -> bool:
        client.vmodels.advance_all()
        return client.store.r.hlen(client.keys.draining) == 0

    wait_for(drained, 60, interval=0.2, what="es_1 drained")
    since = time.time()

    def unloaded() -> bool:
        raw = client.store.r.get(client.keys.worker(w.full_name))
        beat = WorkerState.model_validate_json(raw) if raw else None
        fresh = beat is not None and beat.updated_at > since
        return fresh and "es_1" not in {m.model_id for m in beat.models}

    wait_for(unloaded, 60, interval=0.1, what="es_1's copy unloaded")
    client.delete_vmodel("es")
    assert client.list_models() == []


def test_requests_queued_for_an_auto_deleted_model_without_a_copy_go_to_the_new_active(
    client, workers, svm_path, mlp_path, seed_input
):
    """es_1 has no copy anywhere (here: no worker yet; in a busy pool: evicted) while requests
    for the vmodel wait in its queue. The switch to es_2 is then immediate and es_1 goes with
    its last reference. Nothing would ever load es_1 again: its queued requests must move to
    es_2, not fail NOT_FOUND (the soak caught 11 of them failing)."""
    from mesh.control.vmodels import DRAIN_GRACE_S

    client.set_vmodel("es", "es_1", model_info=sklearn_info(svm_path), auto_delete_target_model=True)
    queued = [client.infer(vmodel_id="es", inputs=[seed_tensor(seed_input)]) for _ in range(12)]
    assert client.store.queue_depth("es_1", [0, 5]) == 12
    client.set_vmodel("es", "es_2", model_info=sklearn_info(mlp_path), auto_delete_target_model=True)
    assert client.get_vmodel_status("es").active_model_id == "es_2"
    assert client.get_model_status("es_1").state is ModelState.NOT_FOUND
    # a producer that read the vmodel just before the switch publishes after it: kombu
    # declares es_1's queue bindings again
    bindings = client.keys.queue_bindings(client.keys.model_queue("es_1"))
    client.store.r.sadd(bindings[0], "late")
    time.sleep(DRAIN_GRACE_S)
    client.vmodels.drain_all()  # what the beat's tick runs
    assert client.store.queue_depth("es_1", [0, 5]) == 0
    assert not client.store.r.exists(*bindings)
    assert client.store.queue_depth("es_2", [0, 5]) == 12
    workers("w1")  # adopts es_2's waiting requests: loads it and answers them
    responses = [r.get(timeout=90) for r in queued]
    assert {r["model_name"] for r in responses} == {"es_2"}
    assert [answer(r) for r in responses] == [8] * 12


def test_sync_returns_only_when_the_transition_is_done(client, workers, svm_path, mlp_path, seed_input):
    workers("w1")
    workers("w2")
    client.set_vmodel("es", "es_1", model_info=sklearn_info(svm_path), load_now=True, sync=True, timeout=120)
    # two copies of es_1: the cutover must wait for two loaded copies of es_2
    client.vmodels.ensure_copies("es_1", 2)
    wait_for(
        lambda: sum(c.state is CopyState.LOADED for c in client.get_model_status("es_1").copies) == 2,
        120, what="two copies of es_1",
    )  # fmt: skip
    st = client.set_vmodel("es", "es_2", model_info=sklearn_info(mlp_path), sync=True, timeout=120)
    assert st.status is VModelState.DEFINED and st.transition_status == "UpToDate"
    assert st.active_model_id == "es_2" and st.active_model_state is ModelState.LOADED
    assert sum(c.state is CopyState.LOADED for c in st.active_model_copies) == 2
    r = client.infer(vmodel_id="es", inputs=[seed_tensor(seed_input)]).get(timeout=60)
    assert r["model_name"] == "es_2"


# ---------------------------------------------------------------- property: refcounts never drift

MODELS = ["m1", "m2", "m3"]
VMODELS = ["v1", "v2"]
FAKE_WORKER = "w0@fake"
ERRORS = ("NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION")


def info(model_id: str, variant: str) -> ModelInfo:
    return ModelInfo(runtime="sklearn", uri=f"file:///models/{model_id}-{variant}.joblib")


@dataclass
class Rec:
    variant: str
    refs: int = 0
    auto: bool = False


@dataclass
class Model:
    """ModelMesh's semantics (kserve/modelmesh VModelManager.java: setVModel, deleteVModel and
    the transition driver), with its refcount leaks fixed, for one
    worker that holds the copies: a retarget switches at once when forced, when the active
    has no copy, or when both the target and the active are LOADED (one copy is parity)."""

    models: dict[str, Rec] = field(default_factory=dict)
    vmodels: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # active, target, owner
    copied: set[str] = field(default_factory=set)  # models with a copy (loading or loaded)
    loaded: set[str] = field(default_factory=set)

    def _drop(self, m: str) -> None:
        del self.models[m]
        self.copied.discard(m)
        self.loaded.discard(m)

    def _switches(self, active: str, target: str) -> bool:
        return active not in self.copied or (target in self.loaded and active in self.loaded)

    def _move(self, old: set[str], new: set[str]) -> None:
        for m in new - old:
            self.models[m].refs += 1
        for m in old - new:
            rec = self.models[m]
            rec.refs -= 1
            if rec.refs == 0 and rec.auto:
                self._drop(m)

    def apply(self, op: tuple) -> object:
        result = self._apply(op)
        if op[0] == "set" and result == "ok":
            self.advance(op[1])  # set_vmodel drives a pending transition at once
        return result

    def _apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "register":
            _, m, x = op
            if m in self.models:
                return "ok" if self.models[m].variant == x else "ALREADY_EXISTS"
            self.models[m] = Rec(x)
            return "ok"
        if kind == "unregister":
            (_, m) = op
            if m not in self.models:
                return "ok"
            if self.models[m].refs > 0:
                return "FAILED_PRECONDITION"
            self._drop(m)
            return "ok"
        if kind == "load":
            (_, m) = op
            if m not in self.models:
                return False
            self.copied.add(m)
            self.loaded.add(m)
            return True
        if kind == "delete":
            _, v, owner = op
            vm = self.vmodels.get(v)
            if vm is None or (owner is not None and vm[2] != owner):
                return "ok"
            self._move({vm[0], vm[1]}, set())
            del self.vmodels[v]
            return "ok"
        assert kind == "set"
        _, v, m, x, auto, force, update_only, expected, owner = op
        vm = self.vmodels.get(v)
        if expected is not None:
            if vm is None:
                if expected != m:
                    return "FAILED_PRECONDITION"
            elif owner is not None and vm[2] != owner:
                return "ALREADY_EXISTS"
            elif vm[1] not in (expected, m):
                return "FAILED_PRECONDITION"
        rec = self.models.get(m)
        if x is None:
            if rec is None:
                return "NOT_FOUND"
        elif rec is not None and rec.variant != x:
            return "ALREADY_EXISTS"
        if vm is None:
            if update_only:
                return "NOT_FOUND"
            new = (m, m, owner or "")
        else:
            if owner is not None and vm[2] != owner:
                return "ALREADY_EXISTS"
            active, target, vowner = vm
            if m == target and (m == active or not force):
                return "ok"
            if m != active and (force or self._switches(active, m)):
                active = m
            new = (active, m, vowner)
        if x is not None and rec is None:
            self.models[m] = Rec(x, auto=auto)
        self._move({vm[0], vm[1]} if vm else set(), {new[0], new[1]})
        self.vmodels[v] = new
        return "ok"

    def advance(self, v: str) -> None:
        """The transition driver's step: switch when the cutover rule allows it."""
        vm = self.vmodels.get(v)
        if vm is not None and vm[0] != vm[1] and self._switches(vm[0], vm[1]):
            self._move({vm[0], vm[1]}, {vm[1]})
            self.vmodels[v] = (vm[1], vm[1], vm[2])

    def tick(self) -> None:
        for v in sorted(self.vmodels):
            self.advance(v)


def run_op(c: MeshClient, op: tuple) -> object:
    kind = op[0]
    try:
        if kind == "register":
            c.register_model(op[1], info(op[1], op[2]))
        elif kind == "unregister":
            c.unregister_model(op[1])
        elif kind == "load":
            return c.store.mark_copy(op[1], FAKE_WORKER, CopyState.LOADED)
        elif kind == "delete":
            c.delete_vmodel(op[1], owner=op[2])
        else:
            _, v, m, x, auto, force, update_only, expected, owner = op
            c.set_vmodel(
                v, m, model_info=info(m, x) if x else None, auto_delete_target_model=auto,
                force=force, update_only=update_only, expected_target_model_id=expected, owner=owner,
            )  # fmt: skip
    except MeshError as exc:
        if exc.code not in ERRORS:
            raise
        return exc.code
    return "ok"


def observe(c: MeshClient) -> Model:
    """The mesh's state in the model's terms (and the invariants that must always hold)."""
    seen = Model()
    for rec in c.list_models():
        seen.models[rec.model_id] = Rec(rec.info.uri.rsplit("-", 1)[1][0], rec.refs, rec.auto_delete)
        raw = c.store.r.hget(c.keys.copies(rec.model_id), FAKE_WORKER)
        if raw is not None:
            seen.copied.add(rec.model_id)
            if CopyInfo.model_validate_json(raw).state is CopyState.LOADED:
                seen.loaded.add(rec.model_id)
    for vm in c.list_vmodels():
        seen.vmodels[vm.vmodel_id] = (vm.active_model_id, vm.target_model_id, vm.owner)
    # invariants: refs == references held by vmodels; no dangling reference; no unreferenced
    # auto-delete model left; the transitions index matches the records
    held: Counter = Counter()
    for active, target, _ in seen.vmodels.values():
        held.update({active, target})
    assert {m: r.refs for m, r in seen.models.items() if r.refs} == dict(held)
    assert not [m for m, r in seen.models.items() if r.auto and r.refs == 0]
    index = {k.decode(): v.decode() for k, v in c.store.r.hgetall(c.keys.transitions).items()}
    assert index == {v: t for v, (a, t, _) in seen.vmodels.items() if a != t}
    return seen


OWNERS = [None, None, None, None, "o1", "o2"]
# weights by repetition (sampled_from draws uniformly; one_of would not weight duplicates):
# sets are what move references, loads are what let transitions complete
KINDS = ["set"] * 8 + ["load"] * 2 + ["register", "unregister", "delete"]


@st.composite
def ops(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(KINDS))
    if kind == "set":
        return (
            "set",
            draw(st.sampled_from(VMODELS)),
            draw(st.sampled_from(MODELS)),
            draw(st.sampled_from([None, "A", "A", "B"])),  # model_info variant
            draw(st.booleans()),  # auto_delete_target_model
            draw(st.sampled_from([False, False, False, True])),  # force
            draw(st.sampled_from([False, False, False, False, True])),  # update_only
            draw(st.sampled_from([None] * 6 + MODELS)),  # expected_target_model_id
            draw(st.sampled_from(OWNERS)),
        )
    if kind == "register":
        return ("register", draw(st.sampled_from(MODELS)), draw(st.sampled_from("AB")))
    if kind == "delete":
        return ("delete", draw(st.sampled_from(VMODELS)), draw(st.sampled_from(OWNERS)))
    return (kind, draw(st.sampled_from(MODELS)))


steps = st.lists(
    st.sampled_from(["pair", "pair", "pair", "tick"]).flatmap(
        lambda s: st.just("tick") if s == "tick" else st.tuples(ops(), ops())
    ),
    min_size=10,
    max_size=30,
)


def test_property_two_clients_refcounts_never_drift(redis_url, prefix):
    """Random register/set/delete/unregister (and copy loads, and scheduler ticks) from two
    clients at once. After every concurrent pair of operations, the results and the state must
    be those of the pair run one after the other, in one order or the other (the operations are
    atomic), per the in-memory model; and reference counts always equal the references held.

    One simulated worker holds the copies. Between steps every registered model gets one
    (LOADING until a "load" operation), so transitions really stay pending until their target
    is loaded. The worker is shutting down, so the mesh places no loads of its own: copies
    change only by the test's operations, and the model can predict every decision."""
    clients = [MeshClient(redis_url=redis_url, prefix=prefix) for _ in range(2)]
    r = redis.Redis.from_url(redis_url)
    pool = ThreadPoolExecutor(max_workers=2)

    def reset() -> None:
        for pattern in (f"{prefix}:*", f"{prefix}.*"):
            keys = list(r.scan_iter(match=pattern, count=1000))
            if keys:
                r.delete(*keys)
        now = time.time()
        worker = WorkerState(
            name=FAKE_WORKER, host="h", pid=1, capacity_bytes=10**9, used_bytes=0,
            started_at=now, updated_at=now, shutting_down=True,
        )  # fmt: skip
        clients[0].store.write_heartbeat(worker, 600.0)

    def give_every_model_a_copy(model: Model) -> None:
        for rec in clients[0].list_models():
            copy = CopyInfo(worker=FAKE_WORKER, state=CopyState.LOADING, since=time.time())
            r.hsetnx(clients[0].keys.copies(rec.model_id), FAKE_WORKER, copy.model_dump_json())
        model.copied = set(model.models)

    @settings(
        max_examples=30, deadline=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )  # fmt: skip
    @given(steps)
    def check(program: list) -> None:
        reset()
        model = Model()
        for step in program:
            if step == "tick":
                clients[0].vmodels.advance_all()
                model.tick()
                assert observe(clients[0]) == model
                continue
            op_a, op_b = step
            barrier = threading.Barrier(2)

            def go(i: int, op: tuple) -> object:
                barrier.wait(timeout=30)
                return run_op(clients[i], op)

            fa, fb = pool.submit(go, 0, op_a), pool.submit(go, 1, op_b)
            got = (fa.result(timeout=60), fb.result(timeout=60))
            seen = observe(clients[0])
            explanations = []
            for order in ((0, 1), (1, 0)):
                trial = deepcopy(model)
                results = [None, None]
                for i in order:
                    results[i] = trial.apply(step[i])
                if tuple(results) == got and trial == seen:
                    model = trial
                    break
                explanations.append((order, results, trial))
            else:
                pytest.fail(
                    f"step {step} gave {got} and state {seen}; no serial order explains it: {explanations}"
                )
            give_every_model_a_copy(model)

    try:
        check()
    finally:
        pool.shutdown(wait=True)
        for c in clients:
            c.close()
        r.close()
