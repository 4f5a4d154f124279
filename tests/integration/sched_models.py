"""A `python`-runtime model for the scheduler tests: its size and its time per batch are read
from its model file (JSON), so a test sets capacities in whole models and can keep requests in
flight long enough to kill a worker under them."""

from __future__ import annotations

import json
import time

import numpy as np


class Sized:
    def __init__(self, path):
        spec = json.loads(path.read_text())
        self._size = int(spec["size"])
        self._delay = float(spec.get("delay", 0.0))

    def size_bytes(self) -> int:
        return self._size

    def predict(self, inputs):
        (x,) = inputs.values()
        if self._delay:
            time.sleep(self._delay)
        return {"y": np.asarray(x, dtype=np.float32).sum(axis=1)}
