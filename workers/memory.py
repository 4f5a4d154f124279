"""A buffered request's memory: its tensors decoded once, the copies of its body dropped, and
freed heap handed back to the system after large requests (issue 21, finding 6); and the
process's resident memory, which tells the collector that garbage piles up
(workers/collector.py).

A large request arrives as a JSON body of ~16 MB; as the worker held it, it cost ~80 MiB
(docs/reliability.md, "Memory of buffered requests"):
- the envelope's `body` text, kept by kombu's virtual Message as `_raw` (kombu
  kombu/transport/virtual/base.py `Message.__init__`: `self._raw = payload`), ~16 MB;
- the same body encoded to bytes (`Message.body`, `postencode='utf-8'`), also held by Celery's
  Request as `_body` (celery/worker/request.py `Request.__init__`), ~16 MB;
- the decoded payload (`message.payload`), whose tensors are Python lists of floats: 32 bytes
  a value (its object and its pointer) against 4 in a float32 array, ~47 MB.
`slim` keeps only the payload, with the tensors as arrays: ~12 MiB for the same request.

glibc keeps freed memory in its arenas (RSS stays up after large requests are answered);
`malloc_trim(0)` returns it, measured: 198 -> 68 MiB held after 6 such requests were freed.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from mesh.protocol.tensors import predecode

from . import libc

log = logging.getLogger("mesh.worker.memory")

# Requests whose body is at least this large are slimmed on arrival; smaller ones are decoded
# in their batch as always (on the inference thread, where a micro-batch's alike items are
# decoded in one conversion).
SLIM_MIN_BYTES = 64 * 1024

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def slim(req: Any) -> None:
    """Decode a Celery Request's tensors to arrays now and drop the copies of its body that
    nothing reads again (an ack, a reject and a requeue work from the delivery tag: the
    message's bytes stay in Redis's unacked hash until its ack)."""
    kwargs = req.kwargs
    if isinstance(kwargs, dict):
        inputs = kwargs.get("inputs")
        if isinstance(inputs, list):
            decoded = predecode(inputs)
            if decoded is not None:
                kwargs["inputs"] = decoded
        items = kwargs.get("items")
        if isinstance(items, list):
            for i, raw in enumerate(items):
                decoded = predecode(raw) if isinstance(raw, list) else None
                if decoded is not None:
                    items[i] = decoded
    message = req._message
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        raw.pop("body", None)
    message.body = None
    req._body = None


def resident_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def malloc_trim() -> bool:
    """Hand the heap's free pages back to the system (glibc `malloc_trim(0)`); False where
    there is no glibc."""
    trim = libc.function("malloc_trim")
    if trim is None:
        return False
    try:
        return bool(trim(ctypes.c_size_t(0)))
    except Exception:  # noqa: BLE001 - a trim is an optimisation only
        log.debug("malloc_trim failed", exc_info=True)
        return False
