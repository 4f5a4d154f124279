"""mesh.protocol.tensors: V2 JSON tensors <-> numpy, and every way a client can get a tensor wrong."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesh.errors import InvalidInput
from mesh.protocol.tensors import (
    DATATYPE_TO_DTYPE,
    DATATYPES,
    InferTensor,
    decode_inputs,
    dtype_to_datatype,
    encode_inputs,
    encode_outputs,
    from_numpy,
    to_numpy,
)
from mesh.tools.examples import SEED_DIGITS_INPUT, seed_digits_tensor


def tensor(data, shape=None, datatype="FP32", name="x"):
    return {
        "name": name,
        "shape": [len(data)] if shape is None else shape,
        "datatype": datatype,
        "data": data,
    }


def json_round_trip(obj):
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- round trips

SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([[0], [2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 2**53 + 1], dtype=np.int64),
    "FP16": np.array([0.5, -65504, np.inf], dtype=np.float16),
    "FP32": np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 7,
    "FP64": np.array([np.pi, -np.inf, 1e-300]),
    "BYTES": np.array(["", "héllo", 'quote " \\ back'], dtype=object),
}


def test_every_datatype_has_a_sample():
    assert set(SAMPLES) == set(DATATYPES) == set(DATATYPE_TO_DTYPE)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_round_trip_through_json(datatype):
    arr = SAMPLES[datatype]
    encoded = from_numpy("t", arr)
    assert encoded["datatype"] == datatype
    assert encoded["shape"] == list(arr.shape)
    back = to_numpy(json_round_trip(encoded))
    assert back.dtype == DATATYPE_TO_DTYPE[datatype]
    assert back.shape == arr.shape
    assert back.tolist() == arr.tolist()


def test_dtype_to_datatype():
    assert dtype_to_datatype(np.dtype(np.float32)) == "FP32"
    assert dtype_to_datatype(np.dtype(">i2")) == "INT16"
    assert dtype_to_datatype(np.dtype("U5")) == "BYTES"
    assert dtype_to_datatype(np.dtype("S5")) == "BYTES"
    assert dtype_to_datatype(np.dtype(object)) == "BYTES"
    with pytest.raises(InvalidInput, match="complex128 has no V2 datatype"):
        dtype_to_datatype(np.dtype(np.complex128))


def test_from_numpy_scalars_and_strings():
    assert from_numpy("s", np.float32(1.5)) == {
        "name": "s",
        "shape": [],
        "datatype": "FP32",
        "data": [1.5],
    }
    assert from_numpy("i", 3)["shape"] == []
    assert from_numpy("u", np.array(["a", "bc"]))["data"] == ["a", "bc"]
    assert from_numpy("b", np.array([b"ab"]))["data"] == ["ab"]  # UTF-8 bytes travel as text
    with pytest.raises(InvalidInput, match="not UTF-8"):
        from_numpy("b", np.array([b"\xff"], dtype=object))
    with pytest.raises(InvalidInput, match="index 1 is dict"):
        from_numpy("o", np.array(["a", {}], dtype=object))
    with pytest.raises(InvalidInput, match="has no V2 datatype"):
        from_numpy("c", np.array([1j]))


def test_from_numpy_data_is_plain_json():
    out = from_numpy("x", np.arange(6, dtype=np.int16).reshape(2, 3))
    assert out["data"] == [0, 1, 2, 3, 4, 5]
    assert all(type(v) is int for v in out["data"])
    json.dumps(out)


def test_to_numpy_accepts_infer_tensor_and_nested_data():
    t = InferTensor(name="x", shape=[2, 2], datatype="INT32", data=[[1, 2], [3, 4]])
    assert to_numpy(t).tolist() == [[1, 2], [3, 4]]
    assert to_numpy(tensor([[1.0], [2.0]], shape=[1, 2])).tolist() == [[1.0, 2.0]]
    assert to_numpy(tensor([[True, False]], shape=[2], datatype="BOOL")).tolist() == [True, False]
    assert to_numpy(tensor([["a"], ["b"]], shape=[2], datatype="BYTES")).tolist() == ["a", "b"]


def test_to_numpy_value_conversions_that_are_fine():
    assert to_numpy(tensor([1, 2.5])).dtype == np.float32  # ints in a float tensor
    assert to_numpy(tensor([1.0, 2.0], datatype="INT64")).tolist() == [1, 2]  # integral floats
    assert to_numpy(tensor([0, 1], datatype="BOOL")).tolist() == [False, True]
    assert to_numpy(tensor([2**64 - 1], datatype="UINT64")).tolist() == [2**64 - 1]
    # Mixed ints and floats stage through float64 in numpy; big ints must stay exact.
    assert to_numpy(tensor([2**62 + 1, 0.0], datatype="INT64")).tolist() == [2**62 + 1, 0]
    nan = to_numpy(tensor([float("nan"), float("inf"), -float("inf")], datatype="FP16"))
    assert math.isnan(nan[0]) and nan[1] == np.inf and nan[2] == -np.inf
    assert to_numpy(tensor([], shape=[0, 3], datatype="INT8")).shape == (0, 3)
    scalar = to_numpy(tensor([4.0], shape=[]))
    assert scalar.shape == () and scalar == 4.0
    assert to_numpy(tensor(["a", b"b"], datatype="BYTES")).tolist() == ["a", b"b"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (tensor([1, 2, 3, 4, 5], shape=[2, 3]), "input 'x': shape [2, 3] needs 6 values, got 5"),
        (tensor([[1, 2], [3, 4]], shape=[5]), "input 'x': shape [5] needs 5 values, got 4"),
        (tensor([1.0, "2"]), "input 'x': FP32 value at index 1 is str '2'; expected a number"),
        (tensor([None]), "input 'x': FP32 value at index 0 is null; expected a number"),
        (tensor([{}]), "input 'x': FP32 value at index 0 is dict {}; expected a number"),
        (
            tensor([1, 2.5], datatype="INT64"),
            "input 'x': INT64 value at index 1 is 2.5; INT64 needs whole numbers",
        ),
        (
            tensor([float("nan")], datatype="INT32"),
            "INT32 value at index 0 is nan; INT32 needs whole numbers",
        ),
        (
            tensor([127, 128], datatype="INT8"),
            "input 'x': INT8 value at index 1 is 128; INT8 holds -128..127",
        ),
        (tensor([-129], datatype="INT8"), "INT8 value at index 0 is -129; INT8 holds -128..127"),
        (tensor([-1], datatype="UINT8"), "UINT8 value at index 0 is -1; UINT8 holds 0..255"),
        (tensor([256], datatype="UINT8"), "UINT8 value at index 0 is 256; UINT8 holds 0..255"),
        (tensor([300.0], datatype="UINT8"), "UINT8 value at index 0 is 300.0; UINT8 holds 0..255"),
        (tensor([2**64], datatype="UINT64"), "UINT64 value at index 0 is 18446744073709551616"),
        (tensor([10**400]), "FP32 value at index 0 is an integer of 1329 bits; it is out of range"),
        (tensor([1e300]), "FP32 value at index 0 is 1e+300; it is out of range for FP32"),
        (tensor([70000], datatype="FP16"), "FP16 value at index 0 is 70000; it is out of range"),
        (
            tensor([2], datatype="BOOL"),
            "BOOL value at index 0 is 2; BOOL values must be true/false",
        ),
        (tensor([0.0], datatype="BOOL"), "BOOL value at index 0 is 0.0; BOOL values must be"),
        (
            tensor(["yes"], datatype="BOOL"),
            "BOOL value at index 0 is str 'yes'; expected true or false",
        ),
        (
            tensor(["a", 1], datatype="BYTES"),
            "input 'x': BYTES value at index 1 is 1, not a string",
        ),
        (tensor([[1, 2], [3]], shape=[3]), "input 'x': nested data is ragged"),
        (tensor([[1, 2], [[3], [4]]], shape=[4]), "input 'x': nested data is ragged"),
        (tensor([1, [2]], shape=[2]), "input 'x': nested data is ragged"),
        (tensor([1], datatype="FP8"), "input 'x': unknown datatype str 'FP8'; use one of BOOL"),
        (tensor([1], datatype=None), "unknown datatype null"),
        (
            tensor([1], shape=[-1]),
            "input 'x': shape must be a list of non-negative integers, got list [-1]",
        ),
        (tensor([1], shape=[1.0]), "shape must be a list of non-negative integers"),
        (tensor([1], shape=[True]), "shape must be a list of non-negative integers"),
        (tensor([1], shape="1"), "input 'x': shape must be a list of integers, got str '1'"),
        (tensor([1], shape=[1] * 9), "input 'x': shape has 9 dimensions; the limit is 8"),
        (
            {"name": "x", "shape": [1], "datatype": "FP32", "data": 1.0},
            "input 'x': data must be a list of values, got float",
        ),
        (
            {"name": "x", "shape": [1], "datatype": "FP32", "data": "1"},
            "data must be a list of values, got str",
        ),
        (tensor([1], name=""), "an input tensor's name must be a non-empty string, got str ''"),
        (tensor([1], name=7), "an input tensor's name must be a non-empty string, got 7"),
        (tensor([1], name="n" * 257), "is 257 characters long; the limit is 256"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "input 'x': missing data"),
        (
            {"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "extra": 1},
            "input 'x': unknown field(s) 'extra'",
        ),
        ({}, "an input tensor: missing data, datatype, name, shape"),
        ([1, 2], "an input tensor must be an object with name, shape, datatype and data, got list"),
        ("x", "got str"),
    ],
)
def test_to_numpy_rejects(bad, message):
    with pytest.raises(InvalidInput) as err:
        to_numpy(bad)
    assert message in str(err.value)


def test_deep_nesting_is_rejected_not_recursed():
    data = [1.0]
    for _ in range(5000):
        data = [data]
    with pytest.raises(InvalidInput, match="nested more than 32 levels"):
        to_numpy(tensor(data, shape=[1]))


def test_error_messages_do_not_echo_huge_values():
    with pytest.raises(InvalidInput) as err:
        to_numpy(tensor(["z" * 100_000]))
    assert len(str(err.value)) < 200


# --------------------------------------------------------------------------- property tests

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=30,
)
shapes = st.lists(st.integers(min_value=-2, max_value=6), max_size=4) | json_values
tensors = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4) | json_values,
        "shape": shapes,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "data": st.lists(json_values, max_size=12)
        | st.lists(json_scalars, max_size=30)
        | json_values,
    },
    optional={"parameters": json_values},
)
raw_tensors = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4) | json_values,
        "shape": shapes,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "raw": st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
        | st.text(max_size=12)
        | json_values,
    },
    optional={"data": json_values},
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(tensors, raw_tensors, json_values))
def test_to_numpy_on_garbage_only_raises_invalid_input(garbage):
    try:
        arr = to_numpy(garbage)
    except InvalidInput:
        return
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == DATATYPE_TO_DTYPE[garbage["datatype"]]
    assert list(arr.shape) == garbage["shape"]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(list(set(DATATYPES) - {"BYTES"})).flatmap(
        lambda dt: hnp.arrays(
            DATATYPE_TO_DTYPE[dt], hnp.array_shapes(min_dims=0, max_dims=4, max_side=4)
        )
    )
)
def test_numeric_round_trip_property(arr):
    back = to_numpy(json_round_trip(from_numpy("p", arr)))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)  # NaNs compare equal here


# --------------------------------------------------------------------------- encode / decode


def test_encode_inputs_forms():
    a, b = np.zeros((2, 3), dtype=np.float32), np.ones(2, dtype=np.int64)
    assert [t["name"] for t in encode_inputs(a)] == ["input_0"]
    assert [t["name"] for t in encode_inputs([a, b])] == ["input_0", "input_1"]
    assert [t["name"] for t in encode_inputs((a, b))] == ["input_0", "input_1"]
    from_dict = encode_inputs({"x": [[1.0, 2.0]], "y": b})
    assert from_dict[0] == {"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]}
    assert from_dict[1]["datatype"] == "INT64"
    assert encode_inputs({"s": ["a", "b"]})[0]["datatype"] == "BYTES"


def test_encode_inputs_validates_and_cleans_v2_tensors():
    raw = {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}
    (clean,) = encode_inputs([raw])
    assert clean == {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    assert all(type(v) is float for v in clean["data"])
    seed = encode_inputs([InferTensor(**seed_digits_tensor())])
    assert seed == [seed_digits_tensor()]
    assert seed[0]["data"] == SEED_DIGITS_INPUT
    with pytest.raises(InvalidInput, match="shape \\[3\\] needs 3 values, got 2"):
        encode_inputs([tensor([1, 2], shape=[3])])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "no inputs"),
        ({}, "no inputs"),
        ([tensor([1]), tensor([2])], "duplicate input name 'x'"),
        ([np.zeros(1), tensor([1])], "only numpy arrays or only V2 tensors, got dict, ndarray"),
        (tensor([1]), "look like a single V2 tensor; wrap it in a list"),
        (InferTensor(**tensor([1.0])), "wrap the single InferTensor in a list"),
        ({"x": [[1], [2, 3]]}, "input 'x': cannot make an array of it"),
        ({"x": np.array([1j])}, "has no V2 datatype"),
        ({1: [1]}, "input names must be strings"),
        ({"": [1]}, "name must be a non-empty string"),
        ("text", "unsupported inputs of type str"),
        (3.5, "unsupported inputs of type float"),
        (None, "unsupported inputs of type NoneType"),
    ],
)
def test_encode_inputs_rejects(bad, message):
    with pytest.raises(InvalidInput) as err:
        encode_inputs(bad)
    assert message in str(err.value)


def test_decode_inputs():
    out = decode_inputs([seed_digits_tensor(), tensor(["a"], datatype="BYTES", name="s")])
    assert list(out) == ["predict", "s"]
    assert out["predict"].shape == (1, 64) and out["predict"].dtype == np.float32
    with pytest.raises(InvalidInput, match="duplicate input name 'x'"):
        decode_inputs([tensor([1]), tensor([2])])
    with pytest.raises(InvalidInput, match="inputs must be a list of tensors, got dict"):
        decode_inputs(tensor([1]))
    with pytest.raises(InvalidInput, match="no inputs"):
        decode_inputs([])
    with pytest.raises(InvalidInput, match="an input tensor must be an object"):
        decode_inputs([[1, 2]])


def test_encode_outputs():
    out = encode_outputs({"label": np.array([8]), "p": np.zeros((1, 2), dtype=np.float32)})
    assert out == [
        {"name": "label", "shape": [1], "datatype": "INT64", "data": [8]},
        {"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.0]},
    ]
    with pytest.raises(InvalidInput, match="outputs must be a dict"):
        encode_outputs([np.zeros(1)])




def _item(data, shape=None, name="x", datatype="FP32"):
    return [{"name": name, "shape": shape or [1, len(data)], "datatype": datatype, "data": data}]


def test_alike_micro_batch_items_are_decoded_in_one_conversion():
    from mesh.protocol.tensors import decode_stacked

    name, arr, rows = decode_stacked([_item([1, 2]), _item([3, 4, 5, 6], [2, 2]), _item([], [0, 2])])
    assert (name, rows) == ("x", [1, 2, 0])
    assert arr.dtype == np.float32 and arr.tolist() == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(
    "items",
    [
        [_item([1, 2]), _item([1, 2], name="y")],  # different names
        [_item([1, 2]), _item([1, 2], datatype="FP64")],  # different datatypes
        [_item([1, 2]), _item([1, 2, 3])],  # different trailing shapes
        [_item([1, 2]), _item([1, 2, 3], [1, 2])],  # a wrong count
        [_item([1, 2]), _item([1, "two"])],  # a value that is not a number
        [_item([1, 2]), _item([1e300, 2])],  # out of FP32's range
        [_item([[1, 2]])],  # nested data
        [_item(["a", "b"], datatype="BYTES")],
        [_item([1, 2]) + _item([3, 4], name="y")],  # two tensors per item
        [_item([1, 2]), "garbage"],
    ],
)
def test_items_that_are_not_alike_or_not_valid_are_left_to_the_one_by_one_path(items):
    from mesh.protocol.tensors import decode_stacked

    assert decode_stacked(items) is None


def test_predecode_gives_the_same_arrays_and_shows_no_data():
    """Issue 21, finding 6: a large request's tensors are held as arrays, not Python lists."""
    import json

    from mesh.protocol.tensors import Decoded, decode_inputs, predecode

    raw = [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
           {"name": "y", "shape": [2], "datatype": "INT64", "data": [7, 8]}]  # fmt: skip
    decoded = predecode(raw)
    assert isinstance(decoded, Decoded)
    arrays = decode_inputs(decoded)
    expected = decode_inputs(raw)
    assert arrays.keys() == expected.keys()
    for name in expected:
        assert arrays[name].dtype == expected[name].dtype
        assert (arrays[name] == expected[name]).all()
    # what `celery inspect` and the events serialize: the tensors' form, not their data
    assert json.loads(json.dumps(decoded)) == [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": "(decoded)"},
        {"name": "y", "shape": [2], "datatype": "INT64", "data": "(decoded)"},
    ]
    # invalid: left as it came, to fail with its usual error in its batch
    assert predecode([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]) is None
    assert predecode("nonsense") is None


def _slow(inputs):
    """What encode_inputs sent for V2 dicts before its shortcut: decoded, then encoded again."""
    return encode_outputs(decode_inputs(list(inputs)))


FLOAT_CASES = [
    [seed_digits_tensor()],
    [tensor([0.5, -1.25, 3.0e38])],
    [tensor([0.5, 1.0e39])],  # beyond FP32: the overflow is refused, as before
    [tensor([1.0e300, -2.0], datatype="FP64")],
    [tensor([float("nan"), 1.0])],
    [tensor([1.0, float("nan")])],
    [tensor([float("inf"), 1.0])],
    [tensor([1.0, float("-inf")], datatype="FP64")],
    [tensor([1, 2.5])],  # an int among the floats
    [tensor([True, 2.5])],
    [tensor([np.float32(1.5), 2.5])],
    [tensor([[1.0, 2.0]], shape=[1, 2])],  # nested data
    [tensor([1.0, 2.0], shape=[3])],  # too few values
    [tensor([1.0], shape=[True])],
    [tensor([1.0], shape=[-1])],
    [tensor([1.0], shape=(1,))],
    [tensor([1.0], name="")],
    [tensor([1.0]), tensor([2.0])],  # duplicate names
    [tensor([1.0], name="a"), tensor([2.0, 3.0], name="b", datatype="FP64")],
    [tensor([], shape=[0])],
    [tensor([1.0], datatype="FP16")],
    [tensor([1.0], datatype="INT32")],
    [{**tensor([1.0]), "extra": 1}],
]


@pytest.mark.parametrize("inputs", FLOAT_CASES)
def test_v2_float_tensors_sent_as_they_came_decode_as_before(inputs):
    """encode_inputs sends clean FP32/FP64 dicts without a round trip through numpy: what the
    worker decodes from them, or the error the producer raises, is what it was."""
    try:
        expected = decode_inputs(json.loads(json.dumps(_slow(inputs))))
    except InvalidInput as exc:
        with pytest.raises(InvalidInput) as err:
            encode_inputs(inputs)
        assert str(err.value) == str(exc)
        return
    got = decode_inputs(json.loads(json.dumps(encode_inputs(inputs))))
    assert got.keys() == expected.keys()
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)


def test_clean_float_tensors_go_out_without_a_conversion():
    seed = seed_digits_tensor()
    (sent,) = encode_inputs([seed])
    assert sent is seed  # no copy, no numpy round trip
    (converted,) = encode_inputs([tensor([1, 2.5])])  # ints: the slow path cleans them
    assert converted["data"] == [1.0, 2.5] and all(type(v) is float for v in converted["data"])


# --------------------------------------------------------------------------- raw tensors


def _raw(arr, name="x", datatype=None):
    arr = np.asarray(arr)
    datatype = datatype or dtype_to_datatype(arr.dtype)
    wire = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "raw": base64.b64encode(wire).decode()}


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(list(set(DATATYPES) - {"BYTES"})).flatmap(
        lambda dt: hnp.arrays(
            DATATYPE_TO_DTYPE[dt], hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
        )
    )
)
def test_raw_round_trip_property(arr):
    """Every numeric and BOOL array, NaN and infinities included, comes back bit for bit from
    its raw form, through JSON, as a writable array of its own dtype in the native byte order."""
    sent = from_numpy("p", arr, raw=True)
    assert set(sent) == {"name", "shape", "datatype", "raw"}
    back = to_numpy(json_round_trip(sent))
    assert back.dtype == arr.dtype and back.shape == arr.shape and back.flags.writeable
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_raw_form_is_little_endian_row_major_whatever_the_array_layout():
    a = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]  # big-endian and not contiguous
    sent = from_numpy("x", a, raw=True)
    assert sent == _raw(np.ascontiguousarray(a).astype("<f8"))
    np.testing.assert_array_equal(to_numpy(sent), a)
    assert to_numpy(sent).dtype == np.dtype("float64")


def test_raw_is_only_for_numbers_bytes_travel_as_data():
    assert from_numpy("s", np.array(["a", "b"]), raw=True) == {
        "name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**_raw(np.zeros(3, np.float32)), "raw": "AAAA!AAA"}, "not valid base64"),
        ({**_raw(np.zeros(3, np.float32)), "raw": "AAAAAAAAAAAAAAAAAAAAAA=="}, "16 raw bytes, expected 12"),
        ({**_raw(np.zeros(3, np.float32)), "raw": "AAAAAAAAAAAAAAAA\n"}, "not valid base64"),
        ({**_raw(np.zeros(3, np.float32)), "shape": [4]}, "12 raw bytes, expected 16"),
        ({**_raw(np.zeros(3, np.float32)), "raw": 5}, "raw must be a base64 string"),
        ({**_raw(np.zeros(3, np.float32)), "raw": "é"}, "not valid base64"),
        ({**_raw(np.zeros(2, np.float32)), "datatype": "BYTES"}, "BYTES travels as data"),
        ({**_raw(np.zeros(2, np.float32)), "datatype": "FP128"}, "raw tensor's datatype"),
        ({**_raw(np.zeros(2, np.float32)), "shape": [-2]}, "non-negative"),
        ({**_raw(np.zeros(2, np.float32)), "name": ""}, "non-empty"),
        (_raw(np.array([0, 2], np.uint8), datatype="BOOL"), "must each be 0 or 1"),
        ({**_raw(np.zeros(2, np.float32)), "data": [0.0, 0.0]}, "unknown field(s) 'raw'"),
        ({k: v for k, v in _raw(np.zeros(2, np.float32)).items() if k != "shape"}, "missing shape"),
    ],
)
def test_raw_tensors_rejected_with_a_reason(bad, message):
    with pytest.raises(InvalidInput) as exc:
        to_numpy(bad)
    assert message in str(exc.value)


def test_encode_inputs_raw_sends_arrays_raw_and_listed_tensors_as_arrays_raw():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, dtype=np.int64)
    for inputs in (a, [a, b], {"input_0": a, "input_1": b}):
        sent = encode_inputs(inputs, raw=True)
        assert all("raw" in t and "data" not in t for t in sent)
        np.testing.assert_array_equal(decode_inputs(sent)["input_0"], a)
    # listed tensors that are not FP32/FP64 lists already clean are re-encoded: raw too
    (t,) = encode_inputs([tensor([1, 2], datatype="INT32")], raw=True)
    assert "raw" in t and to_numpy(t).tolist() == [1, 2]
    # clean float lists go out as they came (converting them costs the producer what it saves
    # the worker), and raw tensors given as V2 dicts are validated and kept raw
    clean = tensor([1.0, 2.0])
    assert encode_inputs([clean], raw=True) == [clean]
    assert encode_inputs([_raw(a)], raw=True) == [_raw(a, name="x")]
    with pytest.raises(InvalidInput, match="not valid base64"):
        encode_inputs([{**_raw(a), "raw": "%%%"}], raw=True)
    assert "data" in encode_inputs(a)[0]  # raw=False: JSON numbers, as before


def test_raw_micro_batch_items_are_decoded_in_one_conversion_and_each_length_is_checked():
    from mesh.protocol.tensors import decode_stacked, raw_items

    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    items = [[_raw(a[0:1])], [_raw(a[1:3])], [_raw(a[3:3])], [_raw(a[3:5])]]
    name, arr, rows = decode_stacked(items)
    assert (name, rows) == ("x", [1, 2, 0, 2]) and arr.tolist() == a.tolist() and arr.flags.writeable
    assert raw_items("x", a, [1, 2, 0, 2]) == items
    # a short item beside a long one adds up to the right total, and must still fail
    short_long = [[{**_raw(a[0:2]), "shape": [1, 2]}], [{**_raw(a[2:3]), "shape": [2, 2]}]]
    assert decode_stacked(short_long) is None
    assert decode_stacked([[_raw(a[0:1])], _item([1, 2])]) is None  # raw and listed: one by one
    assert decode_stacked([[_raw(a[0:1])], [_raw(a[0:1].astype(np.float64))]]) is None
    assert decode_stacked([[_raw(np.array([[1, 2]], np.uint8), datatype="BOOL")]]) is None


def test_a_frames_numeric_columns_go_raw_and_its_text_columns_as_data():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"f": [1.5, 2.5], "i": np.array([1, 2], dtype=np.int32), "b": [True, False],
                          "s": ["a", "b"]})  # fmt: skip
    sent = encode_inputs(frame, raw=True)
    assert ["raw" in t for t in sent] == [True, True, True, False]
    back = decode_inputs(json_round_trip(sent))
    assert back["f"].tolist() == [1.5, 2.5] and back["i"].dtype == np.int32 and back["b"].tolist() == [True, False]
    assert decode_inputs(encode_inputs(frame))["s"].tolist() == back["s"].tolist() == ["a", "b"]


def test_infer_many_items_go_in_the_form_asked_for():
    """MESH_RAW_TENSORS off (workers that predate the raw form) sends no raw tensor, whatever
    the caller passed; on, alike listed items are cut raw from the array their check made."""
    from mesh.client import _many_items

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    listed = [[from_numpy("x", a[i : i + 1])] for i in range(3)]
    raw = [[_raw(a[i : i + 1])] for i in range(3)]
    assert _many_items(listed, raw=True) == raw and _many_items(raw, raw=True) == raw
    assert _many_items(listed, raw=False) == listed
    assert _many_items(raw, raw=False) == listed
