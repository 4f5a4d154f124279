"""Seed 003 as written, end to end: its storage-config entry (with `access_key`), its model
at `sklearn/mnist-svm.joblib` on S3 (moto's server over HTTP), registered as
`example-mnist-isvc` by storage key + path through ModelMesh's management API (what ModelMesh
Serving's controller sends for the seed's InferenceService), the seed's grpcurl request
answering 8, then the name moved to another model under traffic (InProgress, then UpToDate,
no failed request), and a target whose path does not exist blocked (BlockedByFailedLoad)
while the old model keeps answering."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest
from google.protobuf import json_format

from mesh.models import VModelState
from mesh.tools.launcher import free_port, wait_for

from . import gateway_rig

# the seed's `localMinIO` entry, byte for byte but for the endpoint (moto's server here, not
# the seed's cluster-internal http://minio:9000)
SEED_STORAGE_ENTRY = """{
"type": "s3",
"access_key": "AKIAIOSFODNN7EXAMPLE",
"secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
"endpoint_url": "http://minio:9000",
"bucket": "modelmesh-example-models"
}"""

# the seed's grpcurl -d payload, verbatim
SEED_REQUEST = """{ "model_name": "example-mnist-isvc", "inputs": [{ "name": "predict", "shape": [1, 64], "datatype": "FP32", "contents": { "fp32_contents": [0.0, 0.0, 1.0, 11.0, 14.0, 15.0, 3.0, 0.0, 0.0, 1.0, 13.0, 16.0, 12.0, 16.0, 8.0, 0.0, 0.0, 8.0, 16.0, 4.0, 6.0, 16.0, 5.0, 0.0, 0.0, 5.0, 15.0, 11.0, 13.0, 14.0, 0.0, 0.0, 0.0, 0.0, 2.0, 12.0, 16.0, 13.0, 0.0, 0.0, 0.0, 0.0, 0.0, 13.0, 16.0, 16.0, 6.0, 0.0, 0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 7.0, 0.0, 0.0, 0.0, 0.0, 11.0, 13.0, 12.0, 1.0, 0.0] }}]}"""

BUCKET = "modelmesh-example-models"
ISVC = "example-mnist-isvc"


@pytest.fixture
def minio(svm_path: Path, mlp_path: Path) -> Iterator[str]:
    """moto's S3 server over HTTP (no auth enforced, like a fresh MinIO with the seed's keys)
    holding the seed's bucket and model, and a second model to move the name to."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        entry = json.loads(SEED_STORAGE_ENTRY)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=entry["access_key"], aws_secret_access_key=entry["secret_access_key"])  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="sklearn/mnist-svm.joblib", Body=svm_path.read_bytes())
        s3.put_object(Bucket=BUCKET, Key="sklearn/mnist-mlp.joblib", Body=mlp_path.read_bytes())
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def seed_env(mesh_env: dict[str, str], minio: str) -> dict[str, str]:
    # the storage-config secret's shape: each entry a JSON string, as `kubectl get secret` shows it
    entry = SEED_STORAGE_ENTRY.replace("http://minio:9000", minio)
    return {**mesh_env, "MESH_STORAGE_CONFIG": json.dumps({"localMinIO": entry})}


class Traffic:
    """The seed's request sent over gRPC back to back from a thread; every answer checked."""

    def __init__(self, url: str) -> None:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.channel = grpc.insecure_channel(url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.request = json_format.Parse(SEED_REQUEST, service_pb2.ModelInferRequest())
        self.answered_by: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                res = self.stub.ModelInfer(self.request, timeout=60)
                (values,) = json_format.MessageToDict(res)["outputs"][0]["contents"].values()
                if [int(v) for v in values] != [8]:
                    self.failures.append(f"answered {values}")
                self.answered_by.append(res.model_name)
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.channel.close()

    def count(self, model_id: str) -> int:
        return sum(1 for m in list(self.answered_by) if m == model_id)


def test_seed_003_end_to_end(seed_env, workers, client, tmp_path):
    from tritonclient.grpc import service_pb2

    from mesh.tools.launcher import start_beat

    # a long heartbeat TTL: a worker whose heartbeat lapsed on a loaded machine has no live copy,
    # and a vmodel whose active has none switches at once, skipping the InProgress this checks
    w1 = workers("w1", MESH_STORAGE_CONFIG=seed_env["MESH_STORAGE_CONFIG"], MESH_HEARTBEAT_TTL_S="30")
    # the stack as `mesh up` runs it: the beat marks a transition whose target failed to load
    # (ModelMesh's leader does the same)
    beat = start_beat(seed_env, tmp_path / "logs")
    gw = gateway_rig.start(seed_env, tmp_path / "logs")
    pb2, pb2_grpc = gateway_rig.modelmesh_stubs(tmp_path / "stubs")
    channel = grpc.insecure_channel(gw.grpc_url)
    mm = pb2_grpc.ModelMeshStub(channel)
    V = pb2.VModelStatusInfo
    traffic = None
    try:
        # what ModelMesh Serving's controller sends for the seed's InferenceService: the isvc
        # name as a vmodel onto a concrete model given by storage key + path
        first = f"{ISVC}__isvc-6b2eb0b8bf"
        info = pb2.ModelInfo(type="sklearn", path="sklearn/mnist-svm.joblib", key="localMinIO")
        vs = mm.setVModel(pb2.SetVModelRequest(vModelId=ISVC, targetModelId=first, modelInfo=info,
                                               autoDeleteTargetModel=True, loadNow=True, sync=True), timeout=180)  # fmt: skip
        assert vs.status == V.DEFINED and vs.activeModelId == first, vs

        # the seed's grpcurl request, verbatim: 8, answered by the concrete model
        from tritonclient.grpc import service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        res = stub.ModelInfer(json_format.Parse(SEED_REQUEST, service_pb2.ModelInferRequest()), timeout=60)
        shown = json_format.MessageToDict(res)
        assert shown["modelName"] == first
        (values,) = shown["outputs"][0]["contents"].values()
        assert [int(v) for v in values] == [8], shown

        # the InferenceService changed to another model under traffic: InProgress, then UpToDate
        traffic = Traffic(gw.grpc_url)
        wait_for(lambda: traffic.count(first) >= 5, 60, what="traffic on the first model")
        second = f"{ISVC}__isvc-3642375d03"
        info2 = pb2.ModelInfo(type="sklearn", path="sklearn/mnist-mlp.joblib", key="localMinIO")
        # the worker held still while the change is made and read: on a fast host its load of
        # the new target (a small file, its snapshot maybe in the disk cache) and the cutover
        # finished before the first read, which saw UpToDate (a clean-clone CI run)
        os.kill(w1.pid, signal.SIGSTOP)
        try:
            vs = mm.setVModel(pb2.SetVModelRequest(vModelId=ISVC, targetModelId=second, modelInfo=info2,
                                                   autoDeleteTargetModel=True), timeout=60)  # fmt: skip
            seen = [client.get_vmodel_status(ISVC).transition_status]
        finally:
            os.kill(w1.pid, signal.SIGCONT)
        assert vs.status == V.TRANSITIONING and vs.targetModelId == second, vs
        def moved() -> bool:
            st = client.get_vmodel_status(ISVC)
            seen.append(st.transition_status)
            return st.status is VModelState.DEFINED and st.active_model_id == second
        wait_for(moved, 120, interval=0.05, what="the isvc to move to the second model")
        assert seen[0] == "InProgress" and seen[-1] == "UpToDate", seen
        wait_for(lambda: traffic.count(second) >= 5, 60, what="traffic on the second model")
        assert not traffic.failures, traffic.failures[:5]

        # a target whose path does not exist: BlockedByFailedLoad, and the isvc keeps answering
        broken = f"{ISVC}__isvc-0000000000"
        info3 = pb2.ModelInfo(type="sklearn", path="sklearn/does-not-exist.joblib", key="localMinIO")
        mm.setVModel(pb2.SetVModelRequest(vModelId=ISVC, targetModelId=broken, modelInfo=info3,
                                          autoDeleteTargetModel=True), timeout=60)  # fmt: skip
        blocked = wait_for(
            lambda: (s := client.get_vmodel_status(ISVC)).transition_status == "BlockedByFailedLoad" and s,
            180, interval=0.1, what="the transition to be BlockedByFailedLoad",
        )  # fmt: skip
        assert blocked.active_model_id == second and blocked.active_model_serving_state == "Loaded"
        assert blocked.errors, blocked
        over_grpc = mm.getVModelStatus(pb2.GetVModelStatusRequest(vModelId=ISVC), timeout=60)
        assert over_grpc.status == V.TRANSITION_FAILED and over_grpc.activeModelId == second
        assert over_grpc.targetModelStatus.status == pb2.ModelStatusInfo.LOADING_FAILED
        before = traffic.count(second)
        wait_for(lambda: traffic.count(second) >= before + 5, 60, what="the old model to keep answering")
        traffic.stop()
        assert not traffic.failures, traffic.failures[:5]
        assert set(traffic.answered_by) <= {first, second}
    finally:
        if traffic is not None:
            traffic.stop()
        channel.close()
        gw.proc.stop()
        beat.stop()
