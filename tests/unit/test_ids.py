"""UTF-8 ids (mesh/protocol/ids.py) and their one encoding into keys and queue names: every
valid id round-trips, distinct ids never share a name, ids valid before UTF-8 ids keep their
names, and names a producer made up decode to no id."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidId
from mesh.protocol.acl import producer_rules
from mesh.protocol.ids import MAX_ID_BYTES, SAFE_CHARS, decode_id, encode_id, is_valid_id, validate_id
from mesh.protocol.keys import KOMBU_PRIORITY_SEP, UNDECODABLE, Keys

# any text Python can hold, lone surrogates and NUL included, and long enough to pass the limit
texts = st.text(min_size=0, max_size=200) | st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=300)
valid = texts.filter(is_valid_id)
ENCODED_NAME = re.compile(r"[A-Za-z0-9_.:@%-]+")

ODD = ["modèle", "模型", "🤖", "🤖 model", "a b", "a:b", "a*", "a/b", "a?b", "100%", "%41", "a%2Fb",
       "a\nb", "tab\there", "[x]", "x\\y", "é" * 256, "x" * MAX_ID_BYTES, f"a{KOMBU_PRIORITY_SEP}5", "\u200b"]


@settings(max_examples=800, deadline=None)
@given(valid)
def test_every_valid_id_round_trips_through_its_encoding(value):
    encoded = encode_id(value)
    assert ENCODED_NAME.fullmatch(encoded)  # no glob, separator, whitespace or non-ASCII
    assert decode_id(encoded) == value
    keys = Keys("p")
    assert keys.model_from_queue(keys.model_queue(value)) == value
    (found, queue), = {keys.model_of_queue_list(k) for k in keys.queue_list_keys(keys.model_queue(value), [0, 5])}
    assert (found, queue) == (value, keys.model_queue(value))


@settings(max_examples=800, deadline=None)
@given(valid, valid)
def test_distinct_ids_never_share_a_name(a, b):
    if a != b:
        assert encode_id(a) != encode_id(b)


@settings(max_examples=800, deadline=None)
@given(st.text(alphabet=f"{SAFE_CHARS.replace('A-Za-z0-9', 'aZ9')}%0123456789ABCDEFabcdef", max_size=30) | texts)
def test_any_name_decodes_to_at_most_the_one_id_that_encodes_to_it(name):
    value = decode_id(name)
    if value is not None:
        assert is_valid_id(value) and encode_id(value) == name


@pytest.mark.parametrize("value", ["es_1", "name__isvc-3642375d03", "digits@3", "ns:m@3", "a.b-c", "x" * 200])
def test_ids_valid_before_utf8_ids_keep_their_keys_and_queues(value):
    keys = Keys("mesh")
    assert encode_id(value) == value
    assert keys.model_queue(value) == f"mesh.model.{value}"
    assert keys.copies(value) == f"mesh:copies:{value}"
    assert keys.vmodel_lock(value) == f"mesh:vmlock:{value}"


@pytest.mark.parametrize("value", ODD)
def test_odd_ids_are_valid_and_encoded(value):
    assert validate_id(value) == value
    encoded = encode_id(value)
    assert ENCODED_NAME.fullmatch(encoded) and decode_id(encoded) == value


def test_the_encoding_is_percent_encoding_of_utf8_outside_the_safe_set():
    assert encode_id("modèle") == "mod%C3%A8le"
    assert encode_id("模型") == "%E6%A8%A1%E5%9E%8B"
    assert encode_id("a b/c*?%") == "a%20b%2Fc%2A%3F%25"
    assert encode_id("ns:m@3") == "ns:m@3"


@pytest.mark.parametrize("value,why", [
    ("", "is empty"), ("a\x00b", "NUL"), ("\ud800", "surrogate"), ("x" * (MAX_ID_BYTES + 1), "513 bytes"),
    ("é" * 257, "514 bytes"), (None, "string"), (3, "string"), (b"m", "string"),
])  # fmt: skip
def test_invalid_ids_are_refused_with_the_rule(value, why):
    assert not is_valid_id(value)
    for check in (validate_id, encode_id):
        with pytest.raises(InvalidId, match=why) as err:
            check(value)
        assert f"1-{MAX_ID_BYTES} bytes of UTF-8" in str(err.value)
    with pytest.raises(InvalidId):
        Keys("p").model_queue(value)


@pytest.mark.parametrize("name", [
    "", "%", "%4", "%zz", "%c3%a8", "%41", "a%2fb", "%C3", "%FF", "%00", "%ED%A0%80", "a b", "é", "*",
    "x" * (MAX_ID_BYTES + 1), "%C3%A8" * 257,
])  # fmt: skip
def test_made_up_names_decode_to_no_id(name):
    assert decode_id(name) is None
    assert Keys("p").model_from_queue(f"p.model.{name}") is None


def test_an_undecodable_queue_list_is_found_as_itself():
    keys = Keys("p")
    found, queue = keys.model_of_queue_list("p:p.model.%zz\x06\x165")
    assert found == UNDECODABLE + "%zz" and queue == "p.model.%zz"
    assert not is_valid_id(found)  # can never be taken for a registered model
    assert keys.queue_of_found(found) == queue
    assert keys.queue_of_found("模型") == keys.model_queue("模型")
    assert keys.model_of_queue_list("p:p.model.") is None
    assert keys.model_of_queue_list("p:p.worker.w1") is None


def test_acl_patterns_cover_encoded_queues_and_hold_no_encoded_star():
    keys = Keys("p")
    rules = producer_rules(keys)
    assert "~p:p.model.*" in rules and "~p:_kombu.bell.p.model.*" in rules
    assert not any("%2A" in r for r in rules)
    for model_id in ODD:
        queue_key = keys.queue_list_key(keys.model_queue(model_id), 5)
        assert queue_key.startswith("p:p.model.") and not re.search(r"[*?\[\]\\]", queue_key)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_a_workers_name_comes_back_from_its_queue_and_from_no_other(name):
    keys = Keys("p")
    assert keys.worker_from_queue(keys.worker_queue(name)) == name
    assert keys.worker_from_queue(keys.model_queue("m")) is None
    assert keys.worker_from_queue(keys.worker_queue("")) is None
    assert keys.worker_from_queue(f"q.worker.{name}") is None  # another mesh's
