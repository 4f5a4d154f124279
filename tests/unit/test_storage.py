"""Storage config, model locations and their validation, S3 error messages."""

from __future__ import annotations

import json
import logging

import pytest

from mesh.errors import InvalidArgument, ModelLoadFailed, PermissionDenied
from mesh.models import ModelInfo
from mesh.settings import MeshSettings
from mesh.storage.sources import (
    Location,
    Storage,
    _md5_of,
    get_storage,
    load_storage_config,
    local_path,
    parse_location,
    validate_uri,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-SUPERSECRET"
KEY_ID = "AKIAEXAMPLEKEYID"


def entry(**kw) -> dict:
    return {"type": "s3", "access_key_id": KEY_ID, "secret_access_key": SECRET, **kw}


# --- storage config -----------------------------------------------------------------------


def test_inline_json_file_path_and_modelmesh_secret_shapes(tmp_path):
    inline = load_storage_config(json.dumps({"minio": entry(endpoint_url="http://minio:9000", bucket="models")}))
    assert inline.names() == ["minio"]
    assert inline.root["minio"].bucket == "models"
    assert inline.root["minio"].secret_access_key.get_secret_value() == SECRET

    path = tmp_path / "storage.json"
    path.write_text(json.dumps({"a": entry(region="eu-west-1")}))
    assert load_storage_config(str(path)).root["a"].region == "eu-west-1"

    # ModelMesh Serving's storage-config secret holds each entry as a JSON string;
    # `default_bucket` is accepted as another name of `bucket`
    secret_shape = {"localMinIO": json.dumps(entry(default_bucket="bucket1"))}
    assert load_storage_config(json.dumps(secret_shape)).root["localMinIO"].bucket == "bucket1"
    assert load_storage_config(None).names() == []
    assert load_storage_config("  ").names() == []


SEED_003_ENTRY = """{
"type": "s3",
"access_key": "AKIAIOSFODNN7EXAMPLE",
"secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
"endpoint_url": "http://minio:9000",
"bucket": "modelmesh-example-models"
}"""


def test_seed_003_storage_config_with_access_key_is_accepted_as_written():
    # seed 003 shows its `localMinIO` entry with `access_key` (not `access_key_id`), both as an
    # object and as the secret's JSON string
    for value in (json.loads(SEED_003_ENTRY), SEED_003_ENTRY):
        cfg = load_storage_config(json.dumps({"localMinIO": value})).root["localMinIO"]
        assert cfg.access_key_id.get_secret_value() == "AKIAIOSFODNN7EXAMPLE"
        assert cfg.bucket == "modelmesh-example-models"
        assert cfg.endpoint_url == "http://minio:9000"
        assert "AKIAIOSFODNN7EXAMPLE" not in repr(cfg)


def test_storage_config_directory_as_a_mounted_secret(tmp_path):
    # Kubernetes mounts the `storage-config` secret as one file per key, plus its own
    # `..data` link and dotted timestamp directory, which are not keys
    (tmp_path / "localMinIO").write_text(SEED_003_ENTRY)
    (tmp_path / "..data").mkdir()
    (tmp_path / ".hidden").write_text("not json")
    cfg = load_storage_config(str(tmp_path))
    assert cfg.names() == ["localMinIO"]
    assert cfg.root["localMinIO"].access_key_id.get_secret_value() == "AKIAIOSFODNN7EXAMPLE"


def test_secrets_never_show_in_repr_str_or_errors():
    cfg = load_storage_config(json.dumps({"k": entry()}))
    settings = MeshSettings(storage_config=json.dumps({"k": entry()}))
    for text in (repr(cfg), str(cfg), repr(settings), str(settings), repr(cfg.root["k"])):
        assert SECRET not in text and KEY_ID not in text
    # a validation error names the field, never the value
    with pytest.raises(InvalidArgument) as err:
        load_storage_config(json.dumps({"k": entry(secret_access_key=[SECRET], bogus=SECRET)}))
    assert SECRET not in str(err.value)
    assert "secret_access_key" in str(err.value) and "bogus" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        load_storage_config('{"k": {"type": "s3", "secret_access_key": "' + SECRET + '"')
    assert SECRET not in str(err.value) and "not valid JSON" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"k": {"type": "gcs"}}', "not supported"),
        ('{"k": "not json"}', "not JSON"),
        ('{"k": 3}', "must be an object"),
        ("[1]", "JSON object"),
        ('{"bad key!": {"type": "s3"}}', "invalid storage key"),
        ('{"k": {"type": "s3", "endpoint_url": "minio:9000"}}', "endpoint_url"),
        ("/no/such/storage.json", "cannot read"),
    ],
)
def test_bad_storage_configs_are_clear(raw, message):
    with pytest.raises(InvalidArgument, match=message):
        load_storage_config(raw)


# --- locations --------------------------------------------------------------------------


def test_locations_parse():
    assert parse_location("file:///m/es_1/model.joblib") == Location("file", path="/m/es_1/model.joblib")
    assert parse_location("s3://models/digits/1/") == Location("s3", bucket="models", key="digits/1/")
    assert parse_location("s3://models/a.onnx", "minio") == Location(
        "s3", bucket="models", key="a.onnx", storage_key="minio"
    )
    # ModelMesh Serving's storage {key, path}: the path is inside that storage's bucket
    assert parse_location("tensorflow/mnist.savedmodel", "localMinIO") == Location(
        "s3", key="tensorflow/mnist.savedmodel", storage_key="localMinIO"
    )
    assert validate_uri("digits/1/", "minio") == "digits/1/"


@pytest.mark.parametrize(
    ("uri", "storage_key"),
    [
        ("s3://models/../etc/passwd", None),
        ("s3://models/a/../../b", None),
        ("s3://models//etc/passwd", None),  # an absolute key
        ("s3://models/a/./b", None),
        ("s3://models/", None),
        ("s3://models", None),
        ("s3://bad bucket/x", None),
        ("/etc/passwd", "minio"),  # an absolute path inside a storage key
        ("../other-bucket/x", "minio"),
        ("a//b", "minio"),
        ("relative/path.joblib", None),  # no scheme and no storage key
        ("http://example.com/model.joblib", None),
        ("file://host/m.joblib", None),
        ("file://relative", None),
        ("file:///m/../etc/passwd", None),
        ("file:///m/model.joblib", "minio"),
        ("s3://models/a?versionId=1", None),
    ],
)
def test_locations_escaping_their_root_or_malformed_are_rejected(uri, storage_key):
    with pytest.raises(InvalidArgument):
        parse_location(uri, storage_key)


def test_model_info_takes_a_storage_key_and_register_validation_uses_it():
    info = ModelInfo(runtime="sklearn", uri="digits/1/model.joblib", storage_key="minio")
    assert validate_uri(info.uri, info.storage_key) == info.uri
    with pytest.raises(ValueError):
        ModelInfo(runtime="sklearn", uri="x", storage_key="bad key")


def test_local_path(tmp_path):
    f = tmp_path / "m.joblib"
    f.write_bytes(b"x")
    assert local_path(f"file://{f}") == f
    with pytest.raises(ModelLoadFailed, match="not found"):
        local_path(f"file://{tmp_path}/missing.joblib")


# --- choosing the storage entry -----------------------------------------------------------


def storage_with(tmp_path, config: dict) -> Storage:
    return Storage(MeshSettings(storage_config=json.dumps(config), disk_cache_dir=str(tmp_path)))


def test_storage_entry_resolution(tmp_path):
    s = storage_with(
        tmp_path,
        {"a": entry(bucket="baa", endpoint_url="http://127.0.0.1:1"), "b": entry(bucket="bbb"), "default": entry()},
    )
    assert s.resolve_s3(parse_location("s3://baa/k", "a"))[0].name == "a"  # explicit key
    assert s.resolve_s3(parse_location("s3://bbb/k"))[0].name == "b"  # the entry of that bucket
    store, bucket, key = s.resolve_s3(parse_location("m/1/", "a"))
    assert (store.name, bucket, key) == ("a", "baa", "m/1/")  # storage key + path
    # an entry's credentials never serve a bucket it does not name: no fallback to "default"
    # or the only entry, and a storage key does not lend its credentials to another bucket
    with pytest.raises(ModelLoadFailed, match="no MESH_STORAGE_CONFIG entry has bucket 'other'"):
        s.resolve_s3(parse_location("s3://other/k"))
    with pytest.raises(ModelLoadFailed, match="serves bucket 'baa', not 'xxx'"):
        s.resolve_s3(parse_location("s3://xxx/k", "a"))
    only = storage_with(tmp_path, {"solo": entry()})
    with pytest.raises(ModelLoadFailed, match="no MESH_STORAGE_CONFIG entry has bucket 'any'"):
        only.resolve_s3(parse_location("s3://any/k"))

    several = storage_with(tmp_path, {"x": entry(bucket="same"), "y": entry(bucket="same")})
    with pytest.raises(ModelLoadFailed, match="set the model's storage_key"):
        several.resolve_s3(parse_location("s3://same/k"))
    with pytest.raises(ModelLoadFailed, match="not in MESH_STORAGE_CONFIG"):
        several.resolve_s3(parse_location("s3://same/k", "nope"))
    bucketless = storage_with(tmp_path, {"x": entry()})
    with pytest.raises(ModelLoadFailed, match="has no bucket"):
        bucketless.resolve_s3(parse_location("m/1", "x"))
    with pytest.raises(ModelLoadFailed, match="MESH_STORAGE_CONFIG"):
        storage_with(tmp_path, {}).resolve_s3(parse_location("s3://any/k"))


def test_a_bucketless_entry_serves_only_buckets_the_roots_allow(tmp_path):
    raw = json.dumps({"solo": entry()})
    default = Storage(MeshSettings(storage_config=raw, disk_cache_dir=str(tmp_path)))
    # no bucket in the config and no roots: the default roots hold no bucket at all
    with pytest.raises(PermissionDenied, match="PERMISSION_DENIED: s3://any/k is outside"):
        default.resolve_s3(parse_location("s3://any/k", "solo"))
    rooted = Storage(MeshSettings(storage_config=raw, disk_cache_dir=str(tmp_path),
                                  storage_roots="s3://any/models"))  # fmt: skip
    assert rooted.resolve_s3(parse_location("s3://any/models/m1", "solo"))[1:] == ("any", "models/m1")
    with pytest.raises(PermissionDenied, match="s3://any/modelsX/m1 is outside"):
        rooted.resolve_s3(parse_location("s3://any/modelsX/m1", "solo"))
    with pytest.raises(PermissionDenied):
        rooted.resolve_s3(parse_location("s3://other/models/m1", "solo"))


def test_get_storage_is_shared_per_settings(tmp_path):
    a = MeshSettings(storage_config=json.dumps({"k": entry()}), disk_cache_dir=str(tmp_path))
    b = MeshSettings(storage_config=json.dumps({"k": entry()}), disk_cache_dir=str(tmp_path))
    c = MeshSettings(storage_config=json.dumps({"k": entry()}), disk_cache_dir=str(tmp_path / "other"))
    assert get_storage(a) is get_storage(b)
    assert get_storage(a) is not get_storage(c)


def test_md5_from_etag_only_when_it_is_one():
    md5 = "5d41402abc4b2a76b9719d911017c592"
    assert _md5_of(md5, None, None) == md5
    assert _md5_of(md5, "AES256", None) == md5
    assert _md5_of(md5, "aws:kms", None) is None  # KMS ETags are not the MD5
    assert _md5_of(md5, None, "AES256") is None  # nor SSE-C ones
    assert _md5_of(md5 + "-3", None, None) is None  # multipart
    assert _md5_of(None, None, None) is None


def test_an_unreachable_endpoint_is_a_clear_load_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    s = Storage(
        MeshSettings(
            storage_config=json.dumps({"dead": entry(endpoint_url="http://127.0.0.1:9", bucket="models")}),
            disk_cache_dir=str(tmp_path),
            s3_max_attempts=1,
        )
    )
    with pytest.raises(ModelLoadFailed) as err:
        s.acquire("s3://models/digits/1/")
    assert "endpoint unreachable" in str(err.value)
    assert "storage key 'dead'" in str(err.value)
    assert SECRET not in caplog.text and SECRET not in str(err.value)
