"""mesh.protocol.jsonwire: orjson's speed, kombu's values: the same result or the same error
as `kombu.utils.json.loads` for any input."""

from __future__ import annotations

import datetime
import json
import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import serialization
from kombu.utils import json as kombu_json

from mesh.protocol import jsonwire


def _same(a, b) -> bool:
    """Equal, NaN included, and of the same types all the way down (1 vs 1.0 matters)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _outcome(fn, data):
    try:
        return ("ok", fn(data))
    except Exception as exc:
        return ("error", type(exc))


def _check(data) -> None:
    mine, theirs = _outcome(jsonwire.loads, data), _outcome(kombu_json.loads, data)
    assert mine[0] == theirs[0], (data, mine, theirs)
    if mine[0] == "ok":
        assert _same(mine[1], theirs[1]), (data, mine, theirs)
    else:
        assert issubclass(mine[1], theirs[1]) or issubclass(theirs[1], mine[1]), (data, mine, theirs)


JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSONABLE, st.booleans())
def test_any_value_decodes_as_kombu_decodes_it(value, as_bytes):
    text = json.dumps(value, ensure_ascii=False)  # NaN, Infinity, big integers, any character
    _check(text.encode("utf-8", "surrogatepass") if as_bytes else text)
    _check(json.dumps(value))  # ensure_ascii: \u escapes


@pytest.mark.parametrize(
    "data",
    [
        "[18446744073709551616]",  # beyond uint64: orjson would give a float
        "[-9223372036854775809]",  # below int64: likewise
        "[9223372036854775807, -9223372036854775808, 18446744073709551615]",
        "[12345678901234567890.5]",
        "[NaN, Infinity, -Infinity]",
        "[1e999]",
        '["\\ud800"]',  # a lone surrogate, escaped
        '{"\\u005f_type__": "uuid", "__value__": "00000000-0000-0000-0000-000000000001"}',
        '{"a": 1, "a": 2}',
        "",
        "[1,",
        "nul",
        "[" * 5000 + "]" * 5000,
        b"\xff\xfe[1]",  # not UTF-8
        bytearray(b'{"x": [1.5, 2]}'),
        memoryview(b'{"x": "\xc3\xa9"}'),
        "\ud800",  # a str with a lone surrogate in it
    ],
)
def test_edge_cases_decode_as_kombu_decodes_them(data):
    _check(data)


@pytest.mark.parametrize("value", [datetime.datetime(2026, 12, 7, 1, 2, 3), uuid.UUID(int=7), b"\x00\x01"])
def test_kombu_typed_values_come_back_as_kombu_made_them(value):
    text = kombu_json.dumps({"v": value})
    assert jsonwire.loads(text) == kombu_json.loads(text) == {"v": value}


def test_install_makes_kombus_json_serializer_decode_and_encode_with_it(monkeypatch):
    calls = []
    original = jsonwire.loads
    monkeypatch.setattr(jsonwire, "loads", lambda data: calls.append(data) or original(data))
    try:
        jsonwire.install()
        assert serialization.loads('{"a": [1, 2.5]}', "application/json", "utf-8") == {"a": [1, 2.5]}
        assert calls == ['{"a": [1, 2.5]}']
        event = {"type": "task-succeeded", "uuid": "t1", "result": "{'predict': [8]}", "runtime": 0.25, "eta": None}
        content_type, encoding, text = serialization.dumps([event], serializer="json")
        assert (content_type, encoding) == ("application/json", "utf-8")
        assert text == '[{"type":"task-succeeded","uuid":"t1","result":"{\'predict\': [8]}","runtime":0.25,"eta":null}]'
    finally:
        serialization.register_json()  # the other tests of this process get stock kombu back


@settings(max_examples=300, deadline=None)
@given(JSONABLE)
def test_dumps_writes_what_json_dumps_means(value):
    try:
        expected = json.dumps(value)
    except (TypeError, ValueError):
        return
    mine = jsonwire.dumps(value)
    assert isinstance(mine, str)
    assert _same(json.loads(mine), json.loads(expected))


@pytest.mark.parametrize("value", [
    [float("nan")], {"x": [float("inf"), -float("inf")]}, [2**64], [-(2**63) - 1], ["\ud800"], {1: "a"}, [None],
])
def test_dumps_leaves_to_the_standard_library_what_orjson_would_write_differently(value):
    assert jsonwire.dumps(value) == json.dumps(value)


# ------------------------------------------------------------------ encode: kombu's encoder's values


def _kombu_outcome(value):
    try:
        return ("ok", kombu_json.loads(kombu_json.dumps(value)))
    except Exception as exc:
        return ("error", type(exc))


@settings(max_examples=300, deadline=None)
@given(JSONABLE | st.lists(st.tuples(st.integers(), st.text(max_size=4)), max_size=3))
def test_encode_writes_what_kombus_encoder_means(value):
    theirs = _kombu_outcome(value)
    try:
        mine = ("ok", kombu_json.loads(jsonwire.encode(value)))
    except Exception as exc:
        mine = ("error", type(exc))
    assert mine[0] == theirs[0], (value, mine, theirs)
    if mine[0] == "ok":
        assert _same(mine[1], theirs[1]), (value, mine, theirs)


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


class Tagged(str):
    def __json__(self):  # kombu's hook; a str subclass never reaches it in either encoder
        return "tagged"


@pytest.mark.parametrize("value", [
    {"when": datetime.datetime(2026, 12, 7, 1, 2, 3)}, [uuid.UUID(int=7)], {"raw": b"\x00\xff"},
    [float("nan"), 1.0], {"x": float("-inf")}, [2**64], ["\ud800"], {1: "a"}, [Tagged("a")],
    {"deep": _nested(40)},
])
def test_encode_leaves_to_kombu_what_orjson_would_write_differently(value):
    assert jsonwire.encode(value) == kombu_json.dumps(value)


def test_encode_writes_plain_values_with_orjson():
    value = {"uuid": "t1", "clock": 7, "runtime": 0.000213, "ok": True, "parent_id": None, "é": ["ü"]}
    assert jsonwire.encode(value) == '{"uuid":"t1","clock":7,"runtime":0.000213,"ok":true,"parent_id":null,"é":["ü"]}'
