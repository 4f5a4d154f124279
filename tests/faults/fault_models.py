"""`python`-runtime models for the fault tests, imported by the test workers.

Each reads a small JSON spec from its model file, so one class serves many test models:
  {"size": bytes, "delay": seconds per batch, "gate": "/path",
   "hang": seconds, "hang_mark": "/path"}
`delay` keeps batches in flight long enough to kill a worker under them; while the `gate`
file exists the load blocks (a worker can be killed in the middle of a load, and the test
opens the gate by deleting the file).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

GATE_LIMIT_S = 120.0  # a forgotten gate must not block a worker forever
HANG_VALUE = 666.0  # an input holding it hangs a model with "hang" set


class Slow:
    def __init__(self, path):
        spec = json.loads(Path(path).read_text())
        self._size = int(spec.get("size", 1_000_000))
        self._delay = float(spec.get("delay", 0.0))
        self._hang = float(spec.get("hang", 0.0))
        self._hang_mark = spec.get("hang_mark")
        if spec.get("cycle"):  # a model in a reference cycle: only a full collection frees it
            self._self = self
        gate = spec.get("gate")
        if gate:
            deadline = time.monotonic() + GATE_LIMIT_S
            while Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def size_bytes(self) -> int:
        return self._size

    def predict(self, inputs):
        (x,) = inputs.values()
        if self._delay:
            time.sleep(self._delay)
        if self._hang and bool((np.asarray(x) == HANG_VALUE).any()):
            # a predict that hangs on one input (the watchdog's test); the mark says it started
            if self._hang_mark:
                Path(self._hang_mark).write_text("hanging")
            time.sleep(self._hang)
        return {"y": np.asarray(x, dtype=np.float32).sum(axis=1)}


class Deadly(Slow):
    """`Slow`, except that a request holding a negative value kills the worker process at once
    (SIGKILL, as the OOM killer would): a poison message (tests/faults/test_dead_letters.py)."""

    def predict(self, inputs):
        (x,) = inputs.values()
        if (np.asarray(x) < 0).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(inputs)
