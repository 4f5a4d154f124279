"""The gateway with real, independent clients: tritonclient's gRPC and HTTP clients for KServe
V2, grpcio stubs generated from ModelMesh's model-mesh.proto for the management API, and a
replay of ModelMesh's vmodel sequence. Real workers, a real `mesh gateway` process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from mesh import MeshClient
from mesh.tools.launcher import wait_for

from . import gateway_rig
from .test_foundation import sklearn_info


@pytest.fixture
def gateway(mesh_env: dict[str, str], tmp_path: Path) -> Iterator[gateway_rig.Gateway]:
    gw = gateway_rig.start(mesh_env, tmp_path / "logs")
    try:
        yield gw
    finally:
        gw.proc.stop()


@pytest.fixture(scope="module")
def mm(tmp_path_factory: pytest.TempPathFactory):
    return gateway_rig.modelmesh_stubs(tmp_path_factory.mktemp("mmstubs"))


def _seed(seed_input: list[float]) -> np.ndarray:
    return np.asarray([seed_input], dtype=np.float32)


def test_tritonclient_grpc_and_http_answer_8(client: MeshClient, workers, svm_path, seed_input, gateway):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    workers("w1")
    client.register_model("digits", sklearn_info(svm_path))

    g = tg.InferenceServerClient(gateway.grpc_url)
    assert g.is_server_live()
    wait_for(g.is_server_ready, 30, what="the gateway to see a worker")
    meta = g.get_server_metadata()
    assert meta.name == "mesh"
    # raw_input_contents in, raw_output_contents out: tritonclient's default form
    inp = tg.InferInput("predict", [1, 64], "FP32")
    inp.set_data_from_numpy(_seed(seed_input))
    res = g.infer("digits", [inp], request_id="r-1")
    assert res.as_numpy("predict").ravel().tolist() == [8]
    assert res.get_response().model_name == "digits" and res.get_response().id == "r-1"
    assert g.is_model_ready("digits")
    md = g.get_model_metadata("digits")
    assert md.name == "digits" and md.platform == "sklearn"
    assert md.inputs and "predict" in [t.name for t in md.outputs]
    # an output the model gives only when asked for
    scores = g.infer("digits", [inp], outputs=[tg.InferRequestedOutput("decision_function")])
    assert scores.as_numpy("decision_function").shape == (1, 10)
    # unknown model: NOT_FOUND, at once
    with pytest.raises(tg.InferenceServerException) as exc:
        g.infer("nope", [inp])
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    # a wrong shape fails that request alone with INVALID_ARGUMENT
    bad = tg.InferInput("predict", [1, 64], "FP32")
    bad.set_data_from_numpy(_seed(seed_input))
    bad._raw_content = bad._raw_content[:-4]
    with pytest.raises(tg.InferenceServerException) as exc:
        g.infer("digits", [bad])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    g.close()

    h = th.InferenceServerClient(gateway.http_url)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("digits")
    for binary in (True, False):
        inp = th.InferInput("predict", [1, 64], "FP32")
        inp.set_data_from_numpy(_seed(seed_input), binary_data=binary)
        out = th.InferRequestedOutput("predict", binary_data=binary)
        res = h.infer("digits", [inp], outputs=[out])
        assert res.as_numpy("predict").ravel().tolist() == [8]
    assert h.get_model_metadata("digits")["platform"] == "sklearn"
    with pytest.raises(th.InferenceServerException) as exc:
        h.infer("nope", [inp])
    assert exc.value.status() == "404"
    h.close()

    # plain JSON, as the V2 REST spec shows it, routed by the mm-model-id header
    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}]}
    r = requests.post(f"http://{gateway.http_url}/v2/models/anything/infer", json=body,
                      headers={"mm-model-id": "digits"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "digits" and r.json()["outputs"][0]["data"] == [8]
    r = requests.post(f"http://{gateway.http_url}/v2/models/digits/infer", data=b"{not json", timeout=60)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    # what a browser sends for a web page's POST to the loopback port: refused
    r = requests.post(f"http://{gateway.http_url}/v2/models/digits/infer", json=body,
                      headers={"Sec-Fetch-Site": "cross-site"}, timeout=60)  # fmt: skip
    assert r.status_code == 403


def test_typed_contents_routing_headers_and_deadline(client: MeshClient, workers, svm_path, seed_input, gateway):
    """The seed's own request shape (typed fp32_contents, answered in typed contents), routing
    by the mm-* metadata, and a caller's deadline becoming DEADLINE_EXCEEDED."""
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    workers("w1")
    client.register_model("digits-1", sklearn_info(svm_path))
    client.set_vmodel("digits", "digits-1", sync=True, load_now=True)
    channel = grpc.insecure_channel(gateway.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    seed = {"model_name": "digits", "inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32",
                                                "contents": {"fp32_contents": seed_input}}]}  # fmt: skip
    req = json_format.Parse(json.dumps(seed), service_pb2.ModelInferRequest())
    res = json_format.MessageToDict(stub.ModelInfer(req, timeout=60))
    assert res["modelName"] == "digits-1"  # the concrete model, as ModelMesh answers
    assert res["outputs"][0]["contents"]  # typed in, typed out
    (values,) = res["outputs"][0]["contents"].values()
    assert [int(v) for v in values] == [8]

    req.model_name = ""
    for md in (gateway_rig.metadata(mm_model_id="digits-1"), gateway_rig.metadata(mm_vmodel_id="digits")):
        out = stub.ModelInfer(req, metadata=md, timeout=60)
        assert out.model_name == "digits-1"
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req, metadata=[("mm-model-id", "digits-1"), ("mm-vmodel-id", "digits")], timeout=60)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req, timeout=60)  # no name, no header
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    channel.close()


def test_deadline_and_full_queue_map_to_grpc_and_http_codes(client: MeshClient, workers, tmp_path, gateway):
    """A model whose load is held (a gate file): a caller's deadline gives DEADLINE_EXCEEDED
    from the gateway (the request carries that expiry: it is never run late), and a full queue
    RESOURCE_EXHAUSTED / HTTP 429 at once."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from tests.faults.helpers import slow_info

    gate = tmp_path / "gate"
    gate.write_text("closed")
    info = slow_info(tmp_path, "held", gate=gate)
    info = info.model_copy(update={"batching": info.batching.model_copy(update={"max_queue_size": 1})})
    workers("w1")
    client.register_model("held", info)
    channel = grpc.insecure_channel(gateway.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="held")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    try:
        first = stub.ModelInfer.future(req, timeout=1.5)  # waits in the queue: the load is held
        steps = client.router.priority_steps
        wait_for(lambda: client.store.queue_depth("held", steps) >= 1, 30, what="the first request queued")
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(req, timeout=60)
        assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
        r = requests.post(f"http://{gateway.http_url}/v2/models/held/infer", json=body, timeout=60)
        assert r.status_code == 429, r.text
        with pytest.raises(grpc.RpcError) as exc:
            first.result()
        assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        gate.unlink()
        channel.close()
    channel.close()


def test_management_api_replays_modelmesh_vmodel_sequence(client: MeshClient, workers, svm_path, seed_input, gateway, mm):
    """registerModel / getModelStatus / ensureLoaded / setVModel / getVModelStatus (InProgress,
    then UpToDate) / deleteVModel / unregisterModel through ModelMesh's own generated stubs,
    in the order of ModelMesh's VModelsTest (kserve/modelmesh src/test/java/com/ibm/watson/
    modelmesh/VModelsTest.java)."""
    pb2, pb2_grpc = mm
    # a worker whose heartbeat lapses (a loaded CI machine) has no live copy, and a vmodel whose
    # active has none switches at once (docs/vmodels.md): a long TTL keeps InProgress observable
    workers("w1", MESH_HEARTBEAT_TTL_S="30")
    channel = grpc.insecure_channel(gateway.grpc_url)
    stub = pb2_grpc.ModelMeshStub(channel)
    S = pb2.ModelStatusInfo
    V = pb2.VModelStatusInfo
    info = pb2.ModelInfo(type="sklearn", path=f"file://{svm_path}")

    st = stub.registerModel(pb2.RegisterModelRequest(modelId="m-1", modelInfo=info, loadNow=True, sync=True), timeout=120)
    assert st.status == S.LOADED, st
    assert st.modelCopyInfos and st.modelCopyInfos[0].copyStatus == S.LOADED
    # idempotent with the same info; ALREADY_EXISTS with another
    stub.registerModel(pb2.RegisterModelRequest(modelId="m-1", modelInfo=info), timeout=60)
    with pytest.raises(grpc.RpcError) as exc:
        other = pb2.ModelInfo(type="onnx", path=f"file://{svm_path}")
        stub.registerModel(pb2.RegisterModelRequest(modelId="m-1", modelInfo=other), timeout=60)
    assert exc.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert stub.getModelStatus(pb2.GetStatusRequest(modelId="none"), timeout=60).status == S.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        stub.registerModel(pb2.RegisterModelRequest(modelId="bad", modelInfo=pb2.ModelInfo(path="x")), timeout=60)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # a new vmodel on the loaded model: DEFINED at once
    vs = stub.setVModel(pb2.SetVModelRequest(vModelId="vm", targetModelId="m-1"), timeout=60)
    assert vs.status == V.DEFINED and vs.activeModelId == vs.targetModelId == "m-1"
    # updateOnly on a missing vmodel: NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        stub.setVModel(pb2.SetVModelRequest(vModelId="missing", targetModelId="m-1", updateOnly=True), timeout=60)
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND
    # expectedTargetModelId mismatch: FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as exc:
        stub.setVModel(pb2.SetVModelRequest(vModelId="vm", targetModelId="m-2", modelInfo=info,
                                            expectedTargetModelId="other"), timeout=60)  # fmt: skip
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    # retarget to a new model given by modelInfo (auto-deleted later): TRANSITIONING (InProgress)
    # while it loads, then DEFINED (UpToDate) on the new model
    vs = stub.setVModel(pb2.SetVModelRequest(vModelId="vm", targetModelId="m-2", modelInfo=info,
                                             autoDeleteTargetModel=True), timeout=60)  # fmt: skip
    assert vs.targetModelId == "m-2"
    seen = {vs.status}
    def up_to_date():
        s = stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId="vm"), timeout=60)
        seen.add(s.status)
        return s if s.status == V.DEFINED else None
    vs = wait_for(up_to_date, 120, interval=0.05, what="the vmodel to move to m-2")
    assert V.TRANSITIONING in seen, seen
    assert vs.activeModelId == vs.targetModelId == "m-2"
    assert vs.activeModelStatus.status == S.LOADED

    # the vmodel answers inference through the gateway
    import tritonclient.grpc as tg

    g = tg.InferenceServerClient(gateway.grpc_url)
    inp = tg.InferInput("predict", [1, 64], "FP32")
    inp.set_data_from_numpy(_seed(seed_input))
    res = g.infer("vm", [inp])
    assert res.get_response().model_name == "m-2" and res.as_numpy("predict").ravel().tolist() == [8]
    g.close()

    # owner-scoped reads and deletes
    assert stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId="vm", owner="x"), timeout=60).status == V.NOT_FOUND
    stub.deleteVModel(pb2.DeleteVModelRequest(vModelId="vm"), timeout=60)
    gone = stub.getVModelStatus(pb2.GetVModelStatusRequest(vModelId="vm"), timeout=60)
    assert gone.status == V.NOT_FOUND and gone.activeModelId == ""
    # the auto-delete target went with its vmodel; m-1 stays until unregistered
    # (no beat runs here: the test drains as its tick would, once m-2's last requests are answered)
    def auto_deleted() -> bool:
        client.vmodels.advance_all()
        return stub.getModelStatus(pb2.GetStatusRequest(modelId="m-2"), timeout=60).status == S.NOT_FOUND
    wait_for(auto_deleted, 60, interval=0.2, what="m-2 to be auto-deleted")
    stub.ensureLoaded(pb2.EnsureLoadedRequest(modelId="m-1", sync=True), timeout=120)
    stub.unregisterModel(pb2.UnregisterModelRequest(modelId="m-1"), timeout=60)
    assert stub.getModelStatus(pb2.GetStatusRequest(modelId="m-1"), timeout=60).status == S.NOT_FOUND
    stub.unregisterModel(pb2.UnregisterModelRequest(modelId="m-1"), timeout=60)  # idempotent
    channel.close()


UTF8_IDS = ["modèle", "模型", "a b:c*d/e?f%"]


def test_utf8_ids_through_grpc_http_and_management(client: MeshClient, workers, svm_path, seed_input, gateway, mm):
    """UTF-8 ids (and ids holding spaces, `:`, `*`, `/`, `?`) enter through every door of the
    gateway: the management API's strings, ModelInfer's model_name, the `-bin` metadata (gRPC
    base64-encodes it on the wire), REST paths (percent-encoded) and `-bin` headers (base64)."""
    import base64
    from urllib.parse import quote

    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pb2, pb2_grpc = mm
    workers("w1")
    channel = grpc.insecure_channel(gateway.grpc_url)
    mgmt = pb2_grpc.ModelMeshStub(channel)
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    info = pb2.ModelInfo(type="sklearn", path=f"file://{svm_path}")
    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": seed_input}]}
    for i, model_id in enumerate(UTF8_IDS):
        st = mgmt.registerModel(pb2.RegisterModelRequest(modelId=model_id, modelInfo=info, loadNow=True, sync=True),
                                timeout=120)  # fmt: skip
        assert st.status == pb2.ModelStatusInfo.LOADED
        vmodel_id = f"v{i}-{model_id}"
        vs = mgmt.setVModel(pb2.SetVModelRequest(vModelId=vmodel_id, targetModelId=model_id), timeout=60)
        assert vs.activeModelId == model_id
        assert client.get_model_status(model_id).state.value == "LOADED"

        req = service_pb2.ModelInferRequest(model_name=model_id)
        t = req.inputs.add(name="predict", datatype="FP32", shape=[1, 64])
        t.contents.fp32_contents.extend(seed_input)
        assert infer.ModelInfer(req, timeout=60).model_name == model_id
        req.model_name = vmodel_id
        assert infer.ModelInfer(req, timeout=60).model_name == model_id
        req.model_name = ""
        for md in (gateway_rig.metadata(mm_model_id=model_id), gateway_rig.metadata(mm_vmodel_id=vmodel_id),
                   [("mm-model-id-bin", model_id.encode())]):  # fmt: skip
            assert infer.ModelInfer(req, metadata=md, timeout=60).model_name == model_id

        for name in (model_id, vmodel_id):
            r = requests.post(f"http://{gateway.http_url}/v2/models/{quote(name, safe='')}/infer", json=body, timeout=60)
            assert r.status_code == 200, (name, r.text)
            assert r.json()["model_name"] == model_id and r.json()["outputs"][0]["data"] == [8]
            r = requests.get(f"http://{gateway.http_url}/v2/models/{quote(name, safe='')}/ready", timeout=60)
            assert r.status_code == 200 and r.json()["ready"] is True, r.text
        header = base64.b64encode(vmodel_id.encode()).decode()
        r = requests.post(f"http://{gateway.http_url}/v2/models/x/infer", json=body,
                          headers={"mm-vmodel-id-bin": header}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["model_name"] == model_id, r.text
        status = mgmt.getVModelStatus(pb2.GetVModelStatusRequest(vModelId=vmodel_id), timeout=60)
        assert status.activeModelId == model_id
    # a -bin header that is not base64, and an id beyond the documented length: INVALID_ARGUMENT / 400
    r = requests.post(f"http://{gateway.http_url}/v2/models/x/infer", json=body,
                      headers={"mm-model-id-bin": "%%%"}, timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    with pytest.raises(grpc.RpcError) as exc:
        mgmt.getModelStatus(pb2.GetStatusRequest(modelId="é" * 600), timeout=60)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_a_thousand_requests_in_flight_hold_no_thread_each(client: MeshClient, workers, tmp_path, gateway):
    """1000 concurrent ModelInfer calls wait (the model's load is held) while the gateway's
    process keeps the threads it had; once the load completes, every one is answered."""
    import asyncio

    from tritonclient.grpc import service_pb2

    from tests.faults.helpers import slow_info

    def threads() -> int:
        return len(os.listdir(f"/proc/{gateway.proc.pid}/task"))

    gate = tmp_path / "gate"
    gate.write_text("closed")
    info = slow_info(tmp_path, "held", gate=gate, max_batch_size=64)
    workers("w1")
    client.register_model("held", info)
    req = service_pb2.ModelInferRequest(model_name="held")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    n = 1000

    async def run() -> list:
        async with grpc.aio.insecure_channel(gateway.grpc_url) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            before = threads()
            pending = [asyncio.ensure_future(call(req, timeout=300)) for _ in range(n)]
            steps = client.router.priority_steps
            await asyncio.to_thread(wait_for, lambda: client.store.queue_depth("held", steps) >= n, 120,
                                    0.1, "every request queued")  # fmt: skip
            during = threads()
            assert not any(p.done() for p in pending)
            assert during <= before + 4, (before, during)  # none per request
            gate.unlink()
            return await asyncio.gather(*pending)

    try:
        answers = asyncio.run(run())
    finally:
        gate.unlink(missing_ok=True)
    assert len(answers) == n
    assert all(list(a.outputs[0].contents.fp32_contents) == [10.0] for a in answers)


# --- deadlines, cancellation and reflection, on a gateway in this process (its client's reply
# listener can be inspected); the model has no worker, so every request waits in its queue

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


def _idle_model(client: MeshClient) -> None:
    from mesh import ModelInfo

    client.register_model("idle", ModelInfo(runtime="sklearn", uri="file:///nonexistent/idle.joblib"))


def _quiet(client: MeshClient) -> bool:
    """Nothing of the gateway's requests left in its client's reply listener."""
    replies = client._replies
    return replies is None or (replies.pending() == 0 and replies.awaiting() == 0)


def _grpc_request():
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name="idle")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    return req


def test_timeout_parameter_and_the_gateways_default_deadline(client: MeshClient):
    """Triton's `timeout` parameter (microseconds) bounds a REST or gRPC request; a request
    with no deadline of its own gets MESH_GATEWAY_REQUEST_TIMEOUT_S; a bad value is a 400 /
    INVALID_ARGUMENT at once. Each leaves nothing in the reply listener."""
    import time

    import tritonclient.http as th
    from tritonclient.grpc import service_pb2_grpc

    _idle_model(client)
    with gateway_rig.in_process(client, gateway_request_timeout_s=1.5) as gw:
        url = f"http://{gw.http_url}/v2/models/idle/infer"
        t0 = time.monotonic()
        r = requests.post(url, json={**BODY, "parameters": {"timeout": 200_000}}, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 504, r.text
        # its own deadline, not the gateway's 1.5 s default, ended it (the message names whose)
        assert "caller's deadline" in r.json()["error"], (took, r.text)
        wait_for(lambda: _quiet(client), 5, interval=0.02, what="the reply listener to forget the request")

        # no deadline of its own: the gateway's default
        t0 = time.monotonic()
        r = requests.post(url, json=BODY, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 504 and "MESH_GATEWAY_REQUEST_TIMEOUT_S" in r.json()["error"], r.text
        assert took >= 1.4, took  # not before the default deadline (1.5 s); the message says whose
        # 0 is Triton's "no timeout": the default again
        r = requests.post(url, json={**BODY, "parameters": {"timeout": 0}}, timeout=30)
        assert r.status_code == 504 and "MESH_GATEWAY_REQUEST_TIMEOUT_S" in r.json()["error"], r.text

        for bad in ("100", -1, 1.5, True, 10**20, None):
            params = {"timeout": bad} if bad is not None else []
            t0 = time.monotonic()
            r = requests.post(url, json={**BODY, "parameters": params}, timeout=30)
            assert r.status_code == 400, (bad, r.text)
            assert "timeout" in r.json()["error"] or "parameters" in r.json()["error"], r.text
            assert time.monotonic() - t0 < 1.0

        # tritonclient's own `timeout=` (microseconds, as it documents)
        h = th.InferenceServerClient(gw.http_url)
        inp = th.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.asarray([[1, 2, 3, 4]], dtype=np.float32))
        with pytest.raises(th.InferenceServerException) as exc:
            h.infer("idle", [inp], timeout=100_000)
        assert exc.value.status() == "504"
        h.close()

        channel = grpc.insecure_channel(gw.grpc_url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = _grpc_request()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(req)  # no gRPC deadline: the gateway's default ends it
        assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "MESH_GATEWAY_REQUEST_TIMEOUT_S" in exc.value.details() and 1.4 < time.monotonic() - t0 < 5
        req.parameters["timeout"].int64_param = 100_000  # shorter than the gRPC deadline: it wins
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(req, timeout=30)
        assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 1.2
        req.parameters["timeout"].string_param = "100"
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(req, timeout=30)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "timeout" in exc.value.details()
        channel.close()
        wait_for(lambda: _quiet(client), 5, interval=0.02, what="the reply listener to forget every request")


def test_a_client_that_goes_away_leaves_nothing_pending(client: MeshClient):
    """A REST client that disconnects, and a gRPC call cancelled by its client, end the wait
    for their answers at once (not at the deadline, 60 s here): the gateway's reply listener
    holds nothing of them."""
    import socket

    from tritonclient.grpc import service_pb2_grpc

    _idle_model(client)
    with gateway_rig.in_process(client, gateway_request_timeout_s=60) as gw:
        body = json.dumps(BODY).encode()
        sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=10)
        sock.sendall(b"POST /v2/models/idle/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        wait_for(lambda: client._replies is not None and client._replies.pending() == 1, 10, interval=0.02,
                 what="the request in flight")  # fmt: skip
        sock.close()
        wait_for(lambda: _quiet(client), 5, interval=0.02, what="the disconnected request to be forgotten")

        channel = grpc.insecure_channel(gw.grpc_url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(_grpc_request(), timeout=60)
        wait_for(lambda: client._replies.pending() == 1, 10, interval=0.02, what="the gRPC request in flight")
        call.cancel()
        wait_for(lambda: _quiet(client), 5, interval=0.02, what="the cancelled call to be forgotten")
        channel.close()


def test_grpc_reflection_lists_and_describes_the_services(client: MeshClient):
    """What `grpcurl -plaintext HOST:8033 list` / `describe` ask: the reflection service lists
    both APIs and gives their descriptors; MESH_GATEWAY_REFLECTION=false turns it off."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with gateway_rig.in_process(client) as gw:
        channel = grpc.insecure_channel(gw.grpc_url)
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "mmesh.ModelMesh",
                "grpc.reflection.v1alpha.ServerReflection"} <= services, services  # fmt: skip
        pool = DescriptorPool(db)
        infer = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelInfer")
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert "raw_input_contents" in infer.input_type.fields_by_name
        mm = pool.FindServiceByName("mmesh.ModelMesh")
        assert {"registerModel", "setVModel", "getVModelStatus"} <= set(mm.methods_by_name)
        pool.FindServiceByName("grpc.reflection.v1alpha.ServerReflection")
        channel.close()
    with gateway_rig.in_process(client, gateway_reflection=False, gateway_management=False) as gw:
        channel = grpc.insecure_channel(gw.grpc_url)
        with pytest.raises(grpc.RpcError) as exc:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert exc.value.code() is grpc.StatusCode.UNIMPLEMENTED
        channel.close()
