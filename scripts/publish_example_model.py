#!/usr/bin/env python3
"""Publish the digits example's model (docs/quickstart.md) into an S3 model repository
(docker-compose's init step).

Trains the digits SVM (mesh.tools.examples.train_digits_svm: the model whose answer to the
example input of kserve/modelmesh-serving docs/predictors/README.md is 8) and uploads it in
the repository layout of docs/storage.md §4:

    s3://<bucket>/<prefix>/<name>/<version>/model.joblib
    s3://<bucket>/<prefix>/<name>/<version>/_READY        written last: the publish marker

Credentials and the endpoint come from MESH_STORAGE_CONFIG (ModelMesh Serving's
storage-config shape), entry --storage-key. The bucket is created if missing. Waits up to
--wait seconds for the endpoint (MinIO may still be starting). Idempotent: a version that is
already published is left alone.

    python scripts/publish_example_model.py --storage-key minio --prefix repo --name mnist-svm
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mesh.policy.repository import READY_MARKER
from mesh.settings import MeshSettings
from mesh.storage.sources import S3Store, load_storage_config
from mesh.tools.examples import train_digits_svm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage-key", default="minio", help="MESH_STORAGE_CONFIG entry (default: minio)")
    ap.add_argument("--bucket", default=None, help="default: the storage entry's bucket")
    ap.add_argument("--prefix", default="repo", help="repository prefix in the bucket (MESH_MODEL_DIR=s3://<bucket>/<prefix>)")
    ap.add_argument("--name", default="mnist-svm", help="model name in the repository")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the S3 endpoint")
    args = ap.parse_args(argv)

    settings = MeshSettings()
    config = load_storage_config(settings.storage_config)
    entry = config.root.get(args.storage_key)
    if entry is None:
        print(f"MESH_STORAGE_CONFIG has no entry {args.storage_key!r} (has: {config.names()})", file=sys.stderr)
        return 1
    bucket = args.bucket or entry.bucket
    if not bucket:
        print(f"no bucket: pass --bucket or set \"bucket\" in entry {args.storage_key!r}", file=sys.stderr)
        return 1
    prefix = args.prefix.strip("/")
    base = f"{prefix}/{args.name}/{args.version}" if prefix else f"{args.name}/{args.version}"

    with tempfile.TemporaryDirectory(prefix="mesh-publish-") as tmp:
        s3 = S3Store(args.storage_key, entry, settings, Path(tmp)).client
        deadline = time.monotonic() + args.wait
        while True:
            try:
                buckets = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
                break
            except Exception as exc:  # botocore's connection and HTTP errors: MinIO not up yet
                if time.monotonic() >= deadline:
                    print(f"S3 endpoint {entry.describe()} not reachable: {exc}", file=sys.stderr)
                    return 1
                time.sleep(1.0)
        if bucket not in buckets:
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}")
        marker = f"{base}/{READY_MARKER}"
        if "Contents" in s3.list_objects_v2(Bucket=bucket, Prefix=marker, MaxKeys=1):
            print(f"s3://{bucket}/{base}/ is already published")
            return 0
        model = train_digits_svm(Path(tmp) / "model.joblib")
        s3.upload_file(str(model), bucket, f"{base}/model.joblib")
        s3.put_object(Bucket=bucket, Key=marker, Body=b"{}")  # last: the version now exists
        print(f"published s3://{bucket}/{base}/model.joblib ({model.stat().st_size} bytes) and {READY_MARKER}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
