"""KServe V2 tensors between the gateway's wire forms and Mesh's JSON tensors.

Three wire forms come in and go out: gRPC typed `contents` (`fp32_contents`, ...), gRPC
`raw_input_contents` / `raw_output_contents` (flat little-endian bytes per tensor, the form
tritonclient sends), and REST JSON with or without Triton's binary-data extension (a JSON
header of `Inference-Header-Content-Length` bytes followed by the tensors' bytes; what
tritonclient.http sends by default). Mesh's own form is the V2 JSON tensor
`{"name", "shape", "datatype", "data"}`, or `raw` (base64 bytes) in place of `data`
(mesh/protocol/tensors.py), which validates shapes and values: binary numeric inputs keep
their bytes and go on raw, never as one JSON number per value. This module only unpacks and
packs, and every malformed input raises InvalidInput naming the tensor.

Specs: KServe's V2 protocol (kserve/kserve docs/predict-api/v2: required_api.md and its
gRPC definition) and Triton's binary tensor extension
(triton-inference-server/server docs/protocol/extension_binary_data.md).
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesh.errors import InvalidInput
from mesh.protocol.tensors import DATATYPE_TO_DTYPE, DATATYPES, MAX_DIMS

# which repeated field of InferTensorContents carries each datatype (grpc_predict_v2.proto);
# FP16 has none: it travels only as raw bytes
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LE = {dt: (np.dtype(t).newbyteorder("<") if dt != "BYTES" else None) for dt, t in DATATYPE_TO_DTYPE.items()}


def _where(name: str) -> str:
    return f"input {name!r}"


def _check_datatype(name: str, datatype: str) -> str:
    if datatype not in DATATYPE_TO_DTYPE:
        raise InvalidInput(f"{_where(name)}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
    return datatype


def _count(name: str, shape: Sequence[int]) -> int:
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidInput(f"{_where(name)}: shape {list(shape)} must have at most {MAX_DIMS} non-negative dims")
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _text(name: str, i: int, value: bytes) -> str:
    # Mesh's requests cross the broker as JSON: a BYTES element must be UTF-8 text
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{_where(name)}: BYTES element {i} is not UTF-8 text (Mesh carries BYTES as text)") from None


def unpack_bytes(name: str, raw: bytes) -> list[str]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then its bytes."""
    out: list[str] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"{_where(name)}: raw BYTES data ends inside an element's length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > end:
            raise InvalidInput(f"{_where(name)}: raw BYTES element {len(out)} runs past the end of the data")
        out.append(_text(name, len(out), raw[pos:pos + size]))
        pos += size
    return out


def pack_bytes(values: Sequence[Any]) -> bytes:
    parts = []
    for v in values:
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def raw_to_data(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> list:
    """One tensor's flat data from its raw little-endian bytes."""
    _check_datatype(name, datatype)
    needed = _count(name, shape)
    if datatype == "BYTES":
        data: list = unpack_bytes(name, raw)
    else:
        dtype = _LE[datatype]
        if len(raw) != needed * dtype.itemsize:
            raise InvalidInput(
                f"{_where(name)}: {len(raw)} raw bytes, expected {needed * dtype.itemsize} "
                f"for shape {list(shape)} of {datatype}"
            )
        data = np.frombuffer(raw, dtype=dtype).tolist()
    if len(data) != needed:
        raise InvalidInput(f"{_where(name)}: {len(data)} elements, shape {list(shape)} needs {needed}")
    return data


def raw_tensor(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> dict:
    """One binary input as the Mesh V2 tensor that carries it: a numeric or BOOL tensor keeps
    its bytes (base64, `raw`: no Python number per value, here or in the worker), BYTES is
    unpacked into `data`."""
    if datatype == "BYTES":
        data = raw_to_data(name, datatype, shape, raw)
        return {"name": name, "shape": list(shape), "datatype": datatype, "data": data}
    _check_datatype(name, datatype)
    needed = _count(name, shape)
    size = needed * _LE[datatype].itemsize
    if len(raw) != size:
        raise InvalidInput(
            f"{_where(name)}: {len(raw)} raw bytes, expected {size} for shape {list(shape)} of {datatype}"
        )
    text = binascii.b2a_base64(raw, newline=False).decode("ascii")
    return {"name": name, "shape": list(shape), "datatype": datatype, "raw": text}


def data_to_raw(datatype: str, data: Sequence[Any]) -> bytes:
    if datatype == "BYTES":
        return pack_bytes(data)
    return np.asarray(data, dtype=_LE[datatype]).tobytes()


# ---------------------------------------------------------------------------------- deadlines

# Triton's request `timeout` parameter (its schedule-policy extension,
# triton-inference-server/server docs/protocol/extension_schedule_policy.md): an int64 of
# microseconds, 0 for none; tritonclient sends it as `parameters.timeout` in the REST JSON
# (tritonclient/http/_utils.py) and as `parameters["timeout"].int64_param` over gRPC.
TIMEOUT_PARAM = "timeout"
MAX_TIMEOUT_US = 365 * 24 * 3600 * 10**6  # a deadline beyond a year is a mistake (mesh/client.py)


def _timeout_s(value: int) -> float | None:
    if not 0 <= value <= MAX_TIMEOUT_US:
        raise InvalidInput(
            f"parameters.timeout must be microseconds in [0, {MAX_TIMEOUT_US}] (0: none), not {value}"
        )
    return value / 1e6 if value else None


def rest_timeout(request: Mapping[str, Any]) -> float | None:
    """Seconds of a REST request's `parameters.timeout` (microseconds), None when absent or 0."""
    params = request.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InvalidInput("the request's `parameters` must be an object")
    value = params.get(TIMEOUT_PARAM)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"parameters.timeout must be an integer of microseconds, not {value!r}")
    return _timeout_s(value)


def grpc_timeout(request: Any) -> float | None:
    """Seconds of a ModelInferRequest's `parameters["timeout"]` (int64_param, microseconds),
    None when absent or 0."""
    if TIMEOUT_PARAM not in request.parameters:
        return None
    param = request.parameters[TIMEOUT_PARAM]
    kind = param.WhichOneof("parameter_choice")
    if kind != "int64_param":
        raise InvalidInput(f"parameters[\"timeout\"] must be an int64_param of microseconds, not {kind or 'empty'}")
    return _timeout_s(param.int64_param)


# ---------------------------------------------------------------------------------- gRPC


def grpc_inputs(request: Any) -> list[dict]:
    """Mesh V2 tensors of a ModelInferRequest (typed contents or raw_input_contents)."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raws)} tensors for {len(request.inputs)} inputs: "
            "give one per input, in order"
        )
    tensors = []
    for i, t in enumerate(request.inputs):
        datatype = _check_datatype(t.name, t.datatype)
        shape = [int(d) for d in t.shape]
        if raws:
            if t.HasField("contents"):
                raise InvalidInput(f"{_where(t.name)}: contents and raw_input_contents must not both be given")
            tensors.append(raw_tensor(t.name, datatype, shape, raws[i]))
            continue
        else:
            if datatype == "FP16":
                raise InvalidInput(f"{_where(t.name)}: FP16 has no typed contents; send it in raw_input_contents")
            field = CONTENTS_FIELD[datatype]
            for other in set(CONTENTS_FIELD.values()) - {field}:
                if len(getattr(t.contents, other)):
                    raise InvalidInput(f"{_where(t.name)}: {datatype} data goes in contents.{field}, not {other}")
            values = getattr(t.contents, field)
            data = [_text(t.name, j, v) for j, v in enumerate(values)] if datatype == "BYTES" else list(values)
        tensors.append({"name": t.name, "shape": shape, "datatype": datatype, "data": data})
    if not tensors:
        raise InvalidInput("no inputs: a ModelInferRequest needs at least one input tensor")
    return tensors


def requested(names: Sequence[str], outputs: list[dict]) -> list[dict]:
    """The outputs a request asked for, in its order (all of them when it named none)."""
    if not names:
        return outputs
    by_name = {o["name"]: o for o in outputs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidInput(f"requested outputs {missing} are not produced by the model (it gives {sorted(by_name)})")
    return [by_name[n] for n in names]


def fill_grpc_response(response: Any, result: Mapping[str, Any], outputs: list[dict], *, raw: bool) -> Any:
    """Fill a ModelInferResponse from Mesh's V2 result; `raw`: tensors in raw_output_contents
    (the form the request used). FP16 has no typed field, so it forces raw for all outputs."""
    response.model_name = str(result.get("model_name", ""))
    raw = raw or any(o["datatype"] == "FP16" for o in outputs)
    for o in outputs:
        t = response.outputs.add()
        t.name = o["name"]
        t.datatype = o["datatype"]
        t.shape.extend(int(d) for d in o["shape"])
        if raw:
            response.raw_output_contents.append(data_to_raw(o["datatype"], o["data"]))
        elif o["datatype"] == "BYTES":
            t.contents.bytes_contents.extend(str(v).encode("utf-8") for v in o["data"])
        else:
            getattr(t.contents, CONTENTS_FIELD[o["datatype"]]).extend(o["data"])
    return response


# ---------------------------------------------------------------------------------- REST

_TENSOR_FIELDS = ("name", "shape", "datatype", "data")


def rest_request(body: bytes, header_length: int | None) -> tuple[dict, list[dict]]:
    """(the JSON request, its input tensors in Mesh's form) from a REST infer body, with
    Triton's binary extension when `header_length` (Inference-Header-Content-Length) is given."""
    import json

    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes")
        head, binary = body[:header_length], body[header_length:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except ValueError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object with an `inputs` list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs a non-empty `inputs` list")
    tensors, pos = [], 0
    for t in inputs:
        if not isinstance(t, dict):
            raise InvalidInput("each input must be an object with name, shape, datatype and data")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"{_where(str(t.get('name')))}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
            if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                    or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):  # fmt: skip
                raise InvalidInput("a binary input needs a string name and datatype and an integer shape")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(binary):
                raise InvalidInput(f"{_where(name)}: binary_data_size {size!r} runs past the binary data")
            tensors.append(raw_tensor(name, datatype, shape, binary[pos:pos + size]))
            pos += size
        else:
            extra = set(t) - set(_TENSOR_FIELDS) - {"parameters"}
            if extra:
                raise InvalidInput(f"{_where(str(t.get('name')))}: unknown fields {sorted(extra)}")
            tensors.append({k: t.get(k) for k in _TENSOR_FIELDS})
    if pos != len(binary):
        raise InvalidInput(f"{len(binary) - pos} bytes of binary data follow the JSON that no input claims")
    return request, tensors


def rest_response(result: Mapping[str, Any], request: Mapping[str, Any], outputs: list[dict]) -> tuple[bytes, int | None]:
    """(body, header length or None) of a REST infer response; outputs asked for as binary
    (`binary_data` per output, or `binary_data_output` for all) go after the JSON header."""
    import json

    params = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    binary_all = bool(params.get("binary_data_output"))
    asked = {o.get("name"): o for o in request.get("outputs") or [] if isinstance(o, dict)}
    out_json, blobs = [], []
    for o in outputs:
        p = (asked.get(o["name"]) or {}).get("parameters") or {}
        binary = bool(p.get("binary_data", binary_all)) if isinstance(p, dict) else binary_all
        entry = {"name": o["name"], "shape": o["shape"], "datatype": o["datatype"]}
        if binary:
            blob = data_to_raw(o["datatype"], o["data"])
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = o["data"]
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": result.get("model_name", ""), "outputs": out_json}
    if request.get("id") is not None:
        body["id"] = request["id"]
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
