"""A worker's buffered requests are bounded in bytes (issue 21, finding 6): each buffered 16 MB
request cost ~140 MiB and the prefetch floor let a worker take 64 of them (~9 GiB). Now the
worker takes no more messages once MESH_MAX_BUFFERED_BYTES of requests are buffered; the rest
wait in Redis, and every request is answered.

Kept light: a 3 MiB bound and requests of ~1 MB, for a model that takes one request a batch and
0.1 s a batch, so that the requests pile up in the worker if it lets them. The request limit is
1.2 MB here, so that the worker's estimate of the next message's size (which starts at the
largest body it accepts) comes down to the real size within the first few messages.
"""

from __future__ import annotations

import json

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from mesh.protocol.tensors import encode_inputs
from mesh.tools.launcher import free_port

from .helpers import slow_info, wait_loaded

LIMIT = 3 * 1024**2
N = 24


def gauge(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not exported")


def test_buffered_bytes_stay_within_the_bound_and_every_request_is_answered(client, workers, tmp_path):
    port = free_port()
    workers("w1", MESH_MAX_BUFFERED_BYTES=LIMIT, MESH_MAX_REQUEST_BYTES=1_200_000, MESH_METRICS_PORT=port)
    client.register_model("big", slow_info(tmp_path, "big", delay=0.1, max_batch_size=1))
    wait_loaded(client, "big")
    rng = np.random.default_rng(0)
    arrays = [rng.random((1, 50_000)) for _ in range(N)]
    size = len(json.dumps(encode_inputs({"x": arrays[0]})))
    assert 0.8e6 < size < 1.5e6  # ~1 MB a request: the bound holds about three
    handles = [client.infer(model_id="big", inputs={"x": a}) for a in arrays]
    for a, h in zip(arrays, handles):
        (out,) = h.get(timeout=120)["outputs"]
        assert np.isclose(out["data"][0], a.sum(), rtol=1e-5)
    peak = gauge(port, "mesh_buffered_bytes_max")
    # requests were buffered, never more than the bound and the one message that crossed it
    assert size <= peak <= LIMIT + 1.1 * size, (peak, LIMIT, size)
