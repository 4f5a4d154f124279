"""KServe V2 (Open Inference Protocol) JSON tensors <-> numpy arrays.

Requests cross the broker as JSON, so a tensor travels as `{"name", "shape", "datatype", "data"}`
with `data` a flat row-major list, or, for a numeric or BOOL tensor, as `{"name", "shape",
"datatype", "raw"}` with `raw` the base64 of its little-endian row-major bytes: what a KServe
V2 HTTP client's binary extension and a gRPC client's `raw_input_contents` carry, and what
`MeshClient` sends for arrays (`encode_inputs(..., raw=True)`). A float costs a JSON writer
and reader a Python object each; its raw form is copied (docs/messages.md).

Everything a client sends is untrusted: every malformed tensor raises
`mesh.errors.InvalidInput` with a message naming the tensor, never a numpy exception, so the
API can answer INVALID_ARGUMENT instead of failing a whole batch later.

Decoding is on the hot path of every request. `to_numpy` therefore lets numpy build the array
first and only falls back to an element-by-element walk when the fast path sees something it
cannot accept as-is; that walk is the single source of truth for what is rejected and why.
"""

from __future__ import annotations

import binascii
import math
from itertools import chain
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict

from mesh.errors import InvalidInput

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
DATATYPES: tuple[str, ...] = get_args(Datatype)

MAX_NAME_LENGTH = 256
MAX_DIMS = 8
# Nested `data` is a convenience for Python callers; anything deeper than this is garbage and
# must not be allowed to recurse without bound.
_MAX_NESTING = 32
# Beyond 2**53 a float64 no longer holds every integer, so a float64 staging array cannot be
# trusted to carry an integer tensor exactly; such data takes the exact (slow) path.
_EXACT_FLOAT_INT = 2**53

DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})
_RAW_KEYS = frozenset({"name", "shape", "datatype", "raw"})
# the wire's byte order for raw tensors (KServe V2's binary data is little-endian)
_WIRE_DTYPE = {dt: t.newbyteorder("<") for dt, t in DATATYPE_TO_DTYPE.items() if dt != "BYTES"}
# the largest finite value of each narrow float type: a range check needs no errstate context,
# which cost more than the conversion of a small tensor
_FLOAT_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32)}
_KEYS_TEXT = "name, shape, datatype and data"


class InferTensor(BaseModel):
    """One V2 tensor as it appears in a JSON request or response."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Strict(), Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    shape: Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(max_length=MAX_DIMS)]
    datatype: Datatype
    data: list


def dtype_to_datatype(dtype: np.dtype | type | str) -> str:
    """The V2 datatype carrying `dtype`; str/bytes/object arrays all travel as BYTES."""
    dt = np.dtype(dtype)
    kind, size = dt.kind, dt.itemsize
    if kind == "b":
        return "BOOL"
    if kind in "iu" and size in (1, 2, 4, 8):
        return f"{'UINT' if kind == 'u' else 'INT'}{size * 8}"
    if kind == "f" and size in (2, 4, 8):
        return f"FP{size * 8}"
    if kind in "USO":
        return "BYTES"
    raise InvalidInput(f"numpy dtype {dt} has no V2 datatype (supported: {', '.join(DATATYPES)})")


# --------------------------------------------------------------------------------------------
# decoding


def to_numpy(t: InferTensor | Mapping[str, Any]) -> np.ndarray:
    """Validate one V2 tensor and return it as an array of its datatype and shape."""
    if isinstance(t, InferTensor):
        name, shape, datatype, data = t.name, t.shape, t.datatype, t.data
    elif isinstance(t, Mapping) and t.keys() == _RAW_KEYS:
        return _from_raw(t["name"], t["shape"], t["datatype"], t["raw"])
    elif isinstance(t, Mapping):
        name, shape, datatype, data = _fields(t)
    else:
        raise InvalidInput(
            f"an input tensor must be an object with {_KEYS_TEXT}, got {type(t).__name__}"
        )
    where = _check_name(name)
    dims = _check_shape(where, shape)
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_DTYPE:
        raise InvalidInput(
            f"{where}: unknown datatype {_show(datatype)}; use one of {', '.join(DATATYPES)}"
        )
    if not isinstance(data, (list, tuple)):
        raise InvalidInput(f"{where}: data must be a list of values, got {type(data).__name__}")
    needed = math.prod(dims)
    arr = None if datatype == "BYTES" else _fast_convert(data, DATATYPE_TO_DTYPE[datatype], needed)
    if arr is None:
        arr = _exact_convert(where, dims, datatype, data, needed)
    return arr.reshape(dims)


def _from_raw(name: Any, shape: Any, datatype: Any, raw: Any) -> np.ndarray:
    """A raw tensor (`raw`: base64 of its little-endian row-major bytes) as a writable array of
    its datatype and shape, every field checked as `to_numpy` checks a listed one."""
    where = _check_name(name)
    dims = _check_shape(where, shape)
    wire = _raw_dtype(where, datatype)
    return _raw_array(where, dims, datatype, _unbase64(where, raw, math.prod(dims) * wire.itemsize))


def _raw_dtype(where: str, datatype: Any) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in _WIRE_DTYPE:
        allowed = ", ".join(d for d in DATATYPES if d != "BYTES")
        raise InvalidInput(
            f"{where}: a raw tensor's datatype must be one of {allowed}, not {_show(datatype)} "
            "(BYTES travels as data)"
        )
    return _WIRE_DTYPE[datatype]


def _unbase64(where: str, raw: Any, size: int) -> bytes:
    """`raw`'s bytes, which must be `size` of them."""
    if not isinstance(raw, str):
        raise InvalidInput(f"{where}: raw must be a base64 string, got {type(raw).__name__}")
    try:
        buf = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII text
        raise InvalidInput(f"{where}: raw is not valid base64 ({exc})") from None
    if len(buf) != size:
        raise InvalidInput(f"{where}: {len(buf)} raw bytes, expected {size}")
    return buf


def _raw_array(where: str, dims: list[int], datatype: str, buf: bytes) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=_WIRE_DTYPE[datatype])
    if datatype == "BOOL" and arr.view(np.uint8).max(initial=0) > 1:
        raise InvalidInput(f"{where}: a raw BOOL tensor's bytes must each be 0 or 1")
    # a copy in the native byte order: writable (a model may scale its input in place), and
    # not a view of the decoded text's buffer
    return arr.astype(DATATYPE_TO_DTYPE[datatype]).reshape(dims)


def _fields(t: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    if t.keys() != _TENSOR_KEYS:
        name = t.get("name")
        label = f"input {_clip(repr(name))}" if isinstance(name, str) else "an input tensor"
        form = _RAW_KEYS if "raw" in t and "data" not in t else _TENSOR_KEYS
        missing = sorted(form - t.keys())
        extra = sorted(map(str, t.keys() - form))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown field(s) {', '.join(_clip(repr(k)) for k in extra)}"] if extra else []
        )
        raise InvalidInput(f"{label}: {'; '.join(parts)} (a tensor has exactly {_KEYS_TEXT}, or raw in "
                           "place of data)")
    return t["name"], t["shape"], t["datatype"], t["data"]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"an input tensor's name must be a non-empty string, got {_show(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"input name {name[:40]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    return f"input {name!r}"


def _check_shape(where: str, shape: Any) -> list[int]:
    if not isinstance(shape, (list, tuple)):
        raise InvalidInput(f"{where}: shape must be a list of integers, got {_show(shape)}")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{where}: shape has {len(shape)} dimensions; the limit is {MAX_DIMS}")
    dims = []
    for d in shape:
        # bool is an int subclass, but `true` in a shape is a client bug, not a dimension.
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise InvalidInput(
                f"{where}: shape must be a list of non-negative integers, got {_show(shape)}"
            )
        dims.append(int(d))
    return dims


def _fast_convert(data: Sequence[Any], dtype: np.dtype, needed: int) -> np.ndarray | None:
    """numpy's own conversion when it is provably lossless, else None (take the exact path)."""
    try:
        src = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if src.size != needed:
        return None  # the exact path flattens and reports the count precisely
    src = src.reshape(-1)
    kind, target = src.dtype.kind, dtype.kind
    if kind == "b":
        return src.astype(dtype)
    if kind == "f":
        if target == "f":
            if dtype.itemsize >= src.dtype.itemsize:
                return src.astype(dtype)
            if src.size and -_FLOAT_MAX[dtype] <= src.min() and src.max() <= _FLOAT_MAX[dtype]:
                return src.astype(dtype)  # all finite and in range (NaN fails the comparison)
            with np.errstate(over="ignore", invalid="ignore"):
                out = src.astype(dtype)
            # NaN and +-inf are legal values; a finite value turning into inf is an overflow.
            if not np.isfinite(out).all() and (np.isinf(out) & np.isfinite(src)).any():
                return None
            return out
        if target in "iu":
            if src.size:
                if not np.isfinite(src).all() or (np.trunc(src) != src).any():
                    return None
                lo, hi = src.min(), src.max()
                if max(-lo, hi) > _EXACT_FLOAT_INT or not _int_range_ok(dtype, lo, hi):
                    return None
            return src.astype(dtype)
        return None  # floats are never booleans
    if kind in "iu":
        if target == "f":
            # Only FP16 is narrow enough for an integer to overflow it.
            if dtype.itemsize == 2 and src.size:
                if max(-int(src.min()), int(src.max())) > float(np.finfo(dtype).max):
                    return None
            return src.astype(dtype)
        if src.size:
            lo, hi = src.min(), src.max()
            if target == "b":
                return src.astype(dtype) if lo >= 0 and hi <= 1 else None
            if not _int_range_ok(dtype, lo, hi):
                return None
        return src.astype(dtype)
    return None


def _int_range_ok(dtype: np.dtype, lo: Any, hi: Any) -> bool:
    info = np.iinfo(dtype)
    return int(lo) >= info.min and int(hi) <= info.max


def _exact_convert(
    where: str, dims: list[int], datatype: str, data: Sequence[Any], needed: int
) -> np.ndarray:
    """Element-by-element conversion; raises the precise InvalidInput for the first bad value."""
    flat = _flatten(where, data)
    if len(flat) != needed:
        raise InvalidInput(f"{where}: shape {dims} needs {needed} values, got {len(flat)}")
    dtype = DATATYPE_TO_DTYPE[datatype]
    if datatype == "BYTES":
        for i, v in enumerate(flat):
            if not isinstance(v, (str, bytes)):
                raise InvalidInput(f"{where}: BYTES value at index {i} is {_show(v)}, not a string")
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out
    kind = dtype.kind
    converted: list[Any] = []
    for i, v in enumerate(flat):
        converted.append(_convert_scalar(where, datatype, dtype, kind, i, v))
    return np.array(converted, dtype=dtype).reshape(-1)


def _convert_scalar(where: str, datatype: str, dtype: np.dtype, kind: str, i: int, v: Any) -> Any:
    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"{where}: {datatype} value at index {i} is {_show(v)}; {why}")

    if isinstance(v, (bool, np.bool_)):
        return bool(v) if kind == "b" else int(v)
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if kind == "b":
            if v in (0, 1):
                return bool(v)
            raise bad("BOOL values must be true/false (or 0/1)")
        if kind == "f":
            try:
                f = float(v)
            except OverflowError:
                raise bad(f"it is out of range for {datatype}") from None
            with np.errstate(over="ignore"):
                if math.isinf(dtype.type(f)):
                    raise bad(f"it is out of range for {datatype}")
            return f
        info = np.iinfo(dtype)
        if not info.min <= v <= info.max:
            raise bad(f"{datatype} holds {info.min}..{info.max}")
        return v
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if kind == "b":
            raise bad("BOOL values must be true/false (or 0/1)")
        if kind == "f":
            if math.isfinite(v):
                with np.errstate(over="ignore"):
                    if math.isinf(dtype.type(v)):
                        raise bad(f"it is out of range for {datatype}")
            return v
        if not v.is_integer():
            raise bad(f"{datatype} needs whole numbers")
        info = np.iinfo(dtype)
        if not info.min <= int(v) <= info.max:
            raise bad(f"{datatype} holds {info.min}..{info.max}")
        return int(v)
    raise bad("expected a number" if kind != "b" else "expected true or false")


def _flatten(where: str, data: Sequence[Any]) -> list[Any]:
    """Flatten (possibly nested) data, insisting nested lists are rectangular."""
    if not any(isinstance(v, (list, tuple)) for v in data):
        return list(data)
    out: list[Any] = []
    lengths: list[int] = []  # the length every list at each depth must have
    leaf_depth: list[int] = []  # the depth holding values, once known

    def ragged() -> InvalidInput:
        return InvalidInput(f"{where}: nested data is ragged (not a rectangular array)")

    def walk(node: Sequence[Any], depth: int) -> None:
        if depth > _MAX_NESTING:
            raise InvalidInput(f"{where}: data is nested more than {_MAX_NESTING} levels deep")
        if len(lengths) <= depth:
            lengths.append(len(node))
        elif lengths[depth] != len(node):
            raise ragged()
        nested = [isinstance(v, (list, tuple)) for v in node]
        if any(nested):
            if not all(nested) or (leaf_depth and depth >= leaf_depth[0]):
                raise ragged()
            for v in node:
                walk(v, depth + 1)
            return
        if not leaf_depth:
            leaf_depth.append(depth)
        elif leaf_depth[0] != depth:
            raise ragged()
        out.extend(node)

    walk(data, 0)
    return out


def _show(v: Any) -> str:
    """A short description of a client's value for an error message (never the whole payload)."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple, dict)) and len(v) > 8:
        return f"a {type(v).__name__} of length {len(v)}"
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        # repr of a huge int is slow and may even raise (sys.int_info.str_digits_check_threshold)
        return f"an integer of {v.bit_length()} bits"
    try:
        text = repr(v)
    except Exception:  # a hostile __repr__ must not replace the InvalidInput being built
        text = f"<{type(v).__name__}>"
    if isinstance(v, (int, float)):
        return _clip(text)
    return f"{type(v).__name__} {_clip(text)}"


def _clip(s: str, limit: int = 60) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# encoding


# dtype -> its V2 datatype, for the dtypes outputs came in (a micro-batch encodes one output
# per item: `dtype_to_datatype` and the name's check were half of `from_numpy`'s time)
_DATATYPE_OF: dict[np.dtype, str] = {}


def from_numpy(name: str, arr: Any, raw: bool = False) -> dict[str, Any]:
    """A JSON-ready V2 tensor dict for `arr` (numpy scalars become shape []); `raw`: a numeric
    or BOOL array's values as `raw` (base64 of its little-endian bytes) instead of `data`."""
    if type(name) is not str or not name or len(name) > MAX_NAME_LENGTH:
        _check_name(name)  # raises, saying why
    arr = np.asarray(arr)
    datatype = _DATATYPE_OF.get(arr.dtype)
    if datatype is None:
        datatype = dtype_to_datatype(arr.dtype)
        if len(_DATATYPE_OF) < 64:
            _DATATYPE_OF[arr.dtype] = datatype
    if raw and datatype != "BYTES":
        packed = arr.astype(_WIRE_DTYPE[datatype], copy=False).tobytes()  # row-major whatever the layout
        text = binascii.b2a_base64(packed, newline=False).decode("ascii")
        return {"name": name, "shape": list(arr.shape), "datatype": datatype, "raw": text}
    data = arr.ravel().tolist()
    if datatype == "BYTES":
        data = [_json_string(name, i, v) for i, v in enumerate(data)]
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def _json_string(name: str, i: int, v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        # JSON cannot carry raw bytes; UTF-8 text is the only lossless case without base64.
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"tensor {name!r}: BYTES value at index {i} is not UTF-8 text and cannot be "
                "sent as JSON"
            ) from None
    raise InvalidInput(f"tensor {name!r}: BYTES value at index {i} is {_show(v)}, not a string")


def encode_inputs(inputs: Any, raw: bool = False) -> list[dict[str, Any]]:
    """Normalize what a client passes into a validated list of V2 tensor dicts; `raw`: numeric
    and BOOL arrays in their raw form (`from_numpy`).

    Accepted: one ndarray (named "input_0"); a list/tuple of ndarrays ("input_0", "input_1",
    ...); a dict of name -> array-like; a list of `InferTensor`s or V2 dicts (validated and
    re-emitted clean: flat data of the declared datatype; V2 dicts that are clean already, of
    FP32 or FP64, go out as they came); a pandas DataFrame (one tensor per column,
    `encode_frame`).
    """
    if isinstance(inputs, np.ndarray):
        return [from_numpy("input_0", inputs, raw)]
    if _is_dataframe(inputs):
        return encode_frame(inputs, raw)
    if isinstance(inputs, InferTensor):
        raise InvalidInput(
            "inputs must be a list of tensors; wrap the single InferTensor in a list"
        )
    if isinstance(inputs, Mapping):
        if not inputs:
            raise InvalidInput("no inputs: the dict of name -> array is empty")
        if _TENSOR_KEYS <= inputs.keys():
            raise InvalidInput("inputs look like a single V2 tensor; wrap it in a list")
        out = []
        for name, value in inputs.items():
            if not isinstance(name, str):
                raise InvalidInput(f"input names must be strings, got {_show(name)}")
            try:
                arr = np.asarray(value)
            except (ValueError, TypeError, OverflowError) as e:
                raise InvalidInput(f"input {name!r}: cannot make an array of it: {e}") from None
            out.append(from_numpy(name, arr, raw))
        return out
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InvalidInput("no inputs: the list of tensors is empty")
        if all(isinstance(x, np.ndarray) for x in inputs):
            return [from_numpy(f"input_{i}", a, raw) for i, a in enumerate(inputs)]
        if all(isinstance(x, (InferTensor, Mapping)) for x in inputs):
            clean = _clean_float_tensors(inputs)
            if clean is not None:
                return clean
            arrays = decode_inputs(list(inputs))  # validates every tensor, raw ones included
            if raw and all(type(t) is dict and t.keys() == _RAW_KEYS for t in inputs):
                return list(inputs)  # raw already (the gateway's binary inputs): not encoded again
            return [from_numpy(name, arr, raw) for name, arr in arrays.items()]
        kinds = sorted({type(x).__name__ for x in inputs})
        raise InvalidInput(
            "a list of inputs must hold only numpy arrays or only V2 tensors, "
            f"got {', '.join(kinds)}"
        )
    raise InvalidInput(
        f"unsupported inputs of type {type(inputs).__name__}: pass an ndarray, a list of "
        "ndarrays, a dict of name -> array, or a list of V2 tensors"
    )


# The float datatypes whose V2 dicts may go out as they came (`_clean_float_tensors`): the
# largest finite value each holds
_WIRE_FLOAT_MAX = {"FP32": _FLOAT_MAX[np.dtype(np.float32)], "FP64": math.inf}


def _clean_float_tensors(inputs: Sequence[Any]) -> list[dict[str, Any]] | None:
    """The V2 dicts themselves when each is already what decoding and encoding it again would
    send, else None (validate the slow way): FP32 or FP64, a flat list of Python floats as many
    as its shape holds, all within the datatype's range (NaN allowed, as on the slow path).
    The round trip through numpy was a quarter of a producer's CPU for a small request
    (closedloop svc1); the worker converts these floats to the same array either way."""
    names = set()
    for t in inputs:
        if type(t) is not dict or t.keys() != _TENSOR_KEYS:
            return None
        name, shape, datatype, data = t["name"], t["shape"], t["datatype"], t["data"]
        limit = _WIRE_FLOAT_MAX.get(datatype) if type(datatype) is str else None
        if (limit is None or type(name) is not str or not name or len(name) > MAX_NAME_LENGTH
                or name in names or type(shape) is not list or len(shape) > MAX_DIMS
                or type(data) is not list):  # fmt: skip
            return None
        if not all(type(d) is int and d >= 0 for d in shape) or len(data) != math.prod(shape):
            return None
        if not all(type(x) is float for x in data):
            return None
        # a NaN fails both comparisons where min or max returns it; elsewhere it is skipped,
        # and NaN is a legal value
        if data and not (-limit <= min(data) and max(data) <= limit):
            return None
        names.add(name)
    return list(inputs)


class Decoded(list):
    """A request's tensors decoded already (`predecode`): `arrays` holds them; as a list it
    shows each tensor's name, shape and datatype without its data (what `celery inspect` and
    the events serialize, as JSON). `decode_inputs` returns `arrays` as they are."""

    arrays: dict[str, np.ndarray]


def predecode(raw: Any) -> Decoded | None:
    """A large request's tensors as arrays once, at arrival, in place of the JSON lists they
    came as: a float in a Python list costs 32 bytes (its object and its pointer), 4 or 8 in
    an array, which made a buffered 16 MB request cost ~80 MiB (issue 21, finding 6). None
    when they do not decode: the request then fails (or not) where it always did, with the
    same error, when its batch is decoded."""
    try:
        arrays = decode_inputs(raw)
    except (InvalidInput, TypeError, ValueError, OverflowError, RecursionError):
        return None
    out = Decoded(
        {"name": name, "shape": list(arr.shape), "datatype": dtype_to_datatype(arr.dtype), "data": "(decoded)"}
        for name, arr in arrays.items()
    )
    out.arrays = arrays
    return out


def decode_inputs(raw: Any) -> dict[str, np.ndarray]:
    """Validate a request's list of V2 tensors and return name -> array (names unique)."""
    if isinstance(raw, Decoded):
        return raw.arrays
    if not isinstance(raw, list):
        raise InvalidInput(f"inputs must be a list of tensors, got {type(raw).__name__}")
    if not raw:
        raise InvalidInput("no inputs: the list of tensors is empty")
    out: dict[str, np.ndarray] = {}
    for t in raw:
        arr = to_numpy(t)
        name = t.name if isinstance(t, InferTensor) else t["name"]
        if name in out:
            raise InvalidInput(f"duplicate input name {name!r}")
        out[name] = arr
    return out


def decode_stacked(items: Sequence[Any]) -> tuple[str, np.ndarray, list[int]] | None:
    """Micro-batch items (each a request's list of tensors) that each hold one tensor of the same
    name, datatype and trailing shape, decoded in one conversion: (name, the items' rows stacked,
    rows per item). None when they do not all have that form or one of them is invalid: decode
    them one by one (`decode_inputs`), which says which and why.

    Why: a micro-batch of small tensors spent more in 32 conversions than in its predict.
    """
    first: tuple[Any, Any, list] | None = None
    datas: list[Any] = []
    rows: list[int] = []
    form: Any = None  # the first item's keys: all are listed (data) or all raw
    try:
        for item in items:
            if not (isinstance(item, list) and len(item) == 1 and isinstance(item[0], dict)):
                return None
            t = item[0]
            keys = t.keys()
            if form is None:
                form = keys if keys == _TENSOR_KEYS or keys == _RAW_KEYS else None
            if form is None or keys != form:
                return None
            raw = "raw" in keys
            shape, data = t["shape"], t["raw" if raw else "data"]
            if not (isinstance(shape, list) and shape and isinstance(data, str if raw else list)):
                return None
            n = shape[0]
            if type(n) is not int or n < 0 or (not raw and len(data) != n * math.prod(shape[1:])):
                return None  # nested data, a wrong count, a strange shape: the exact path says
            if first is None:
                first = (t["name"], t["datatype"], shape[1:])
            elif (t["name"], t["datatype"], shape[1:]) != first:
                return None
            datas.append(data)
            rows.append(n)
        if first is None or first[1] == "BYTES":
            return None
        name, datatype, rest = first
        if "raw" in form:
            where = _check_name(name)
            dims = _check_shape(where, [sum(rows), *rest])
            per_row = math.prod(rest) * _raw_dtype(where, datatype).itemsize
            # each item's length checked: a short one beside a long one must not shift rows
            buf = b"".join([_unbase64(where, text, n * per_row) for text, n in zip(datas, rows)])
            return name, _raw_array(where, dims, datatype, buf), rows
        stacked = {"name": name, "shape": [sum(rows), *rest], "datatype": datatype,
                   "data": list(chain.from_iterable(datas))}  # fmt: skip
        return name, to_numpy(stacked), rows
    except (InvalidInput, TypeError, ValueError, OverflowError):
        return None


def raw_items(name: str, stacked: np.ndarray, rows: Sequence[int]) -> list[list[dict[str, Any]]]:
    """Micro-batch items, one raw tensor each, from `decode_stacked`'s result: the array's
    bytes made once and cut per item (a `from_numpy` per item cost twice as much)."""
    datatype = dtype_to_datatype(stacked.dtype)
    packed = stacked.astype(_WIRE_DTYPE[datatype], copy=False).tobytes()
    rest = list(stacked.shape[1:])
    per_row = math.prod(rest) * stacked.dtype.itemsize
    out, start = [], 0
    for n in rows:
        text = binascii.b2a_base64(packed[start : start + n * per_row], newline=False).decode("ascii")
        out.append([{"name": name, "shape": [n, *rest], "datatype": datatype, "raw": text}])
        start += n * per_row
    return out


def encode_outputs(outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The V2 tensor dicts of a model's outputs, in the dict's order."""
    if not isinstance(outputs, Mapping):
        raise InvalidInput(f"outputs must be a dict of name -> array, got {type(outputs).__name__}")
    return [from_numpy(name, arr) for name, arr in outputs.items()]


# --------------------------------------------------------------------------------------------
# tables and outputs


def _is_dataframe(x: Any) -> bool:
    # duck-typed, so that this module never imports pandas
    return type(x).__name__ == "DataFrame" and hasattr(x, "columns") and hasattr(x, "dtypes")


def encode_frame(frame: Any, raw: bool = False) -> list[dict[str, Any]]:
    """A pandas DataFrame as one V2 tensor per column, [rows], named after the column.

    Each column keeps its datatype (int64 stays INT64 beside an FP64 column), so a model
    trained on a DataFrame gets its columns back as it saw them (the worker rebuilds the frame
    in the model's column order: workers/runtimes/tabular.py). Text and categorical columns go
    as BYTES (a categorical's values, not its codes; the worker makes the column categorical
    again for a model that took it so); a column with missing values in a
    nullable integer or boolean dtype has no V2 form and is refused.
    """
    if frame.shape[1] == 0:
        raise InvalidInput("no inputs: the DataFrame has no columns")
    out = []
    for name in frame.columns:
        if not isinstance(name, str):
            raise InvalidInput(f"DataFrame column names must be strings, got {_show(name)}")
        column = frame[name]
        if not hasattr(column, "dtype"):  # a duplicated name selects a frame, not a column
            raise InvalidInput(f"DataFrame column {name!r} appears more than once")
        kind = getattr(column.dtype, "kind", "O")
        if str(column.dtype) == "category" or kind in "OUS":
            values = column.astype(object).to_numpy()
            if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
                raise InvalidInput(f"DataFrame column {name!r} has missing values; BYTES has no null")
            arr = np.empty(len(values), dtype=object)
            arr[:] = [v if isinstance(v, (str, bytes)) else str(v) for v in values]
        else:
            try:
                arr = column.to_numpy(dtype=column.dtype.numpy_dtype if hasattr(column.dtype, "numpy_dtype") else None)
            except (ValueError, TypeError) as e:
                raise InvalidInput(f"DataFrame column {name!r} ({column.dtype}) has no V2 form: {e}") from None
        out.append(from_numpy(name, arr, raw))
    return out


def decode_output_names(raw: Any) -> tuple[str, ...]:
    """The output names of a request's V2 `outputs`: a list of `{"name": ...}` objects (KServe
    V2's form; their `parameters` are accepted and ignored) or of plain names."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidInput(f"outputs must be a non-empty list of {{'name': ...}} objects, got {_show(raw)}")
    names: list[str] = []
    for item in raw:
        if isinstance(item, Mapping):
            extra = set(item) - {"name", "parameters"}
            if extra:
                raise InvalidInput(f"an output request has unknown field(s) {sorted(map(str, extra))}")
            item = item.get("name")
        if not isinstance(item, str) or not item or len(item) > MAX_NAME_LENGTH:
            raise InvalidInput(f"an output's name must be a non-empty string, got {_show(item)}")
        if item in names:
            raise InvalidInput(f"output {item!r} is named twice")
        names.append(item)
    return tuple(names)


def encode_output_names(outputs: Any) -> list[dict[str, str]]:
    """What a client passes as `outputs` (names, or V2 output objects) as the message's list."""
    if isinstance(outputs, str):
        outputs = [outputs]
    return [{"name": n} for n in decode_output_names(outputs)]
