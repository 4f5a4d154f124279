"""The gateway's pure parts: wire forms of tensors, routing ids, ModelMesh's ModelInfo and
status messages, and the committed descriptor set against the .proto files."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from mesh.errors import InvalidArgument, InvalidInput
from mesh.gateway import codec
from mesh.gateway.management import model_info, model_status_info, vmodel_status_info
from mesh.gateway.protos import DESCRIPTORS, HERE, PROTO_FILES, mm, v2
from mesh.gateway.targets import Target, pick
from mesh.models import CopyInfo, CopyState, FailedCopy, ModelState, ModelStatus, VModelState, VModelStatus
from mesh.protocol.tensors import to_numpy


def _request(**kw) -> object:
    return v2.ModelInferRequest(**kw)


def test_typed_contents_become_mesh_tensors_and_outputs_go_back_typed():
    req = _request(model_name="m")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    t.contents.fp32_contents.extend([1.5, 2.0])
    s = req.inputs.add(name="s", datatype="BYTES", shape=[1])
    s.contents.bytes_contents.append("é".encode())
    assert codec.grpc_inputs(req) == [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.0]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["é"]},
    ]
    result = {"model_name": "m@1", "outputs": [{"name": "y", "shape": [1], "datatype": "INT64", "data": [8]}]}
    resp = codec.fill_grpc_response(v2.ModelInferResponse(), result, result["outputs"], raw=False)
    assert resp.model_name == "m@1" and list(resp.outputs[0].contents.int64_contents) == [8]
    assert not resp.raw_output_contents


def test_raw_contents_both_ways_and_bytes_framing():
    req = _request()
    req.inputs.add(name="x", datatype="INT32", shape=[3])
    req.inputs.add(name="s", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(np.asarray([1, -2, 3], dtype="<i4").tobytes())
    req.raw_input_contents.append(codec.pack_bytes(["a", "模型"]))
    x, s = codec.grpc_inputs(req)
    # numbers stay bytes (base64 `raw`: no Python int per value here or in the worker)
    assert x == {"name": "x", "shape": [3], "datatype": "INT32",
                 "raw": base64.b64encode(req.raw_input_contents[0]).decode()}  # fmt: skip
    assert to_numpy(x).tolist() == [1, -2, 3] and s["data"] == ["a", "模型"]
    out = [{"name": "p", "shape": [2], "datatype": "FP16", "data": [0.5, 1.0]}]
    resp = codec.fill_grpc_response(v2.ModelInferResponse(), {"model_name": "m"}, out, raw=False)
    # FP16 has no typed field: raw even when the request was typed
    assert np.frombuffer(resp.raw_output_contents[0], dtype="<f2").tolist() == [0.5, 1.0]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda r: r.raw_input_contents.append(b"\0" * 3), "raw bytes, expected 8"),
        (lambda r: (r.raw_input_contents.extend([b"\0" * 8, b""])), "raw_input_contents holds 2"),
        (lambda r: r.inputs[0].contents.int64_contents.append(1), "goes in contents.fp32_contents"),
    ],
)
def test_malformed_grpc_inputs_are_invalid_input(build, message):
    req = _request()
    req.inputs.add(name="x", datatype="FP32", shape=[2])
    build(req)
    with pytest.raises(InvalidInput, match=message):
        codec.grpc_inputs(req)


def test_bytes_framing_errors_and_non_utf8():
    with pytest.raises(InvalidInput, match="length prefix"):
        codec.unpack_bytes("s", b"\x01\x00")
    with pytest.raises(InvalidInput, match="runs past"):
        codec.unpack_bytes("s", struct.pack("<I", 9) + b"ab")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        codec.unpack_bytes("s", struct.pack("<I", 1) + b"\xff")


def test_rest_json_and_binary_extension():
    tensors = [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]
    req, got = codec.rest_request(json.dumps({"inputs": tensors}).encode(), None)
    assert got == tensors
    blob = np.asarray([3.0, 4.0], dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    req, got = codec.rest_request(head + blob, len(head))
    assert set(got[0]) == {"name", "shape", "datatype", "raw"} and to_numpy(got[0]).tolist() == [3.0, 4.0]
    body, length = codec.rest_response(
        {"model_name": "m"}, req, [{"name": "y", "shape": [1], "datatype": "INT64", "data": [8]}]
    )
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.frombuffer(body[length:], dtype="<i8").tolist() == [8]
    with pytest.raises(InvalidInput, match="no input claims"):
        codec.rest_request(head + blob + b"x", len(head))
    with pytest.raises(InvalidInput, match="not JSON"):
        codec.rest_request(b"{", None)
    with pytest.raises(InvalidInput, match="not produced"):
        codec.requested(["z"], [{"name": "y"}])


def test_routing_ids_from_name_headers_and_bin_forms():
    assert pick("isvc", "", []) == Target(name="isvc")
    assert pick("repo", "3", []) == Target(model_id="repo@3")
    assert pick("ignored", "", [("mm-model-id", "m")]) == Target(model_id="m")
    assert pick("", "", [("mm-vmodel-id-bin", "模型".encode())]) == Target(vmodel_id="模型")
    b64 = base64.b64encode("modèle".encode()).decode().rstrip("=")  # padding optional over HTTP
    assert pick("", "", [("MM-Model-Id-Bin", b64)]) == Target(model_id="modèle")
    with pytest.raises(InvalidArgument, match="only one of model id and vmodel id"):
        pick("", "", [("mm-model-id", "a"), ("mm-vmodel-id", "b")])
    with pytest.raises(InvalidArgument, match="one model id per request"):
        pick("", "", [("mm-model-id", "a"), ("mm-model-id", "b")])
    with pytest.raises(InvalidArgument, match="must include a model name"):
        pick("", "", [("user-agent", "x")])
    with pytest.raises(InvalidArgument, match="not base64"):
        pick("", "", [("mm-model-id-bin", "%%")])


def test_modelmesh_model_info_maps_onto_mesh():
    assert model_info(mm.ModelInfo(type="sklearn", path="sklearn/mnist-svm.joblib", key="localMinIO")).model_dump(
        include={"runtime", "uri", "storage_key"}
    ) == {"runtime": "sklearn", "uri": "sklearn/mnist-svm.joblib", "storage_key": "localMinIO"}
    # ModelMesh Serving's forms: a placement label as type, the model key as JSON
    key = json.dumps({"storage_key": "s", "storage_params": {"bucket": "b"}, "model_type": {"name": "onnx"}})
    info = model_info(mm.ModelInfo(type="", path="m/model.onnx", key=key))
    assert (info.runtime, info.uri, info.storage_key) == ("onnx", "s3://b/m/model.onnx", "s")
    assert model_info(mm.ModelInfo(type="mt:sklearn:1", path="file:///m.joblib")).runtime == "sklearn"
    for bad in (mm.ModelInfo(path="x"), mm.ModelInfo(type="sklearn"), mm.ModelInfo(type="sklearn", path="x", key="{")):
        with pytest.raises(InvalidArgument):
            model_info(bad)


def test_status_messages_use_modelmesh_enums_newest_copy_first():
    st = ModelStatus(
        model_id="m", state=ModelState.LOADED, errors=["boom"],
        copies=[CopyInfo(worker="w1", state=CopyState.LOADED, since=10.0)],
        failed_copies=[FailedCopy(worker="w2", error="boom", time=20.0)],
    )  # fmt: skip
    out = model_status_info(st)
    assert out.status == mm.ModelStatusInfo.LOADED and list(out.errors) == ["boom"]
    assert [(c.location, c.copyStatus, c.time) for c in out.modelCopyInfos] == [
        ("w2", mm.ModelStatusInfo.LOADING_FAILED, 20000), ("w1", mm.ModelStatusInfo.LOADED, 10000)
    ]
    vs = VModelStatus(vmodel_id="v", status=VModelState.TRANSITION_FAILED, active_model_id="a", target_model_id="b",
                      active_model_state=ModelState.LOADED, target_model_state=ModelState.LOADING_FAILED,
                      errors=["not found"])  # fmt: skip
    out = vmodel_status_info(vs)
    assert out.status == mm.VModelStatusInfo.TRANSITION_FAILED
    assert out.activeModelStatus.status == mm.ModelStatusInfo.LOADED
    assert out.targetModelStatus.status == mm.ModelStatusInfo.LOADING_FAILED
    assert list(out.targetModelStatus.errors) == ["not found"]
    steady = vmodel_status_info(VModelStatus(vmodel_id="v", status=VModelState.DEFINED, active_model_id="a",
                                             active_model_state=ModelState.LOADED))  # fmt: skip
    assert steady.targetModelId == "a" and not steady.HasField("targetModelStatus")
    missing = vmodel_status_info(VModelStatus(vmodel_id="v", status=VModelState.NOT_FOUND))
    assert missing.status == mm.VModelStatusInfo.NOT_FOUND and missing.activeModelStatus.status == 0


def test_committed_descriptors_match_the_proto_files(tmp_path):
    """descriptors.binpb is generated from the .proto files (docs/gateway.md): it must not drift."""
    out = tmp_path / "descriptors.binpb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--descriptor_set_out={out}", *PROTO_FILES],
        check=True, cwd=HERE,
    )  # fmt: skip
    assert out.read_bytes() == DESCRIPTORS.read_bytes(), "regenerate mesh/gateway/protos/descriptors.binpb"


def test_errors_map_to_grpc_codes_and_http_statuses():
    import asyncio

    import grpc
    import redis
    from celery.exceptions import TaskRevokedError

    from mesh.errors import DeadlineExceeded, ModelLoadFailed, ModelNotFound, QueueFull
    from mesh.gateway.errors import http_status, status_of

    cases = [
        (ModelNotFound("model 'x' not found"), grpc.StatusCode.NOT_FOUND, 404),
        (InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (TaskRevokedError("expired"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (redis.ConnectionError("redis://:secret@host"), grpc.StatusCode.UNAVAILABLE, 503),
        (ModelLoadFailed("no such file"), grpc.StatusCode.INTERNAL, 500),
        (RuntimeError("?"), grpc.StatusCode.INTERNAL, 500),
    ]
    for exc, code, status in cases:
        got, message = status_of(exc)
        assert (got, http_status(got)) == (code, status), exc
        assert "secret" not in message  # a Redis error's text may hold its URL


def test_triton_timeout_parameter_is_microseconds_validated_both_ways():
    # REST: tritonclient.http sends `parameters.timeout` as a JSON integer of microseconds
    assert codec.rest_timeout({"inputs": []}) is None
    assert codec.rest_timeout({"parameters": {"binary_data_output": True}}) is None
    assert codec.rest_timeout({"parameters": {"timeout": 250_000}}) == 0.25
    assert codec.rest_timeout({"parameters": {"timeout": 0}}) is None  # Triton: 0 is none
    for bad in ("250000", 1.5, True, -1, 10**20, [1]):
        with pytest.raises(InvalidInput, match="timeout"):
            codec.rest_timeout({"parameters": {"timeout": bad}})
    with pytest.raises(InvalidInput, match="parameters"):
        codec.rest_timeout({"parameters": ["timeout"]})
    # gRPC: tritonclient.grpc sets parameters["timeout"].int64_param
    req = _request(model_name="m")
    assert codec.grpc_timeout(req) is None
    req.parameters["timeout"].int64_param = 2_000_000
    assert codec.grpc_timeout(req) == 2.0
    req.parameters["timeout"].int64_param = -5
    with pytest.raises(InvalidInput, match="timeout"):
        codec.grpc_timeout(req)
    req.parameters["timeout"].string_param = "5"
    with pytest.raises(InvalidInput, match="int64_param"):
        codec.grpc_timeout(req)
