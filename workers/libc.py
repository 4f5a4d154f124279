"""The process's C library, for the few calls Python has no API for: `malloc_trim`
(workers/memory.py) and `prctl` (workers/threadnames.py).

Looked up once per process, through the symbols already loaded (`dlopen(NULL)`, libc's among
them on Linux); `ctypes.util.find_library`, which runs `ldconfig -p` in a subprocess, only
where that finds no C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

_lock = threading.Lock()
_found: list[ctypes.CDLL | None] = []  # [the library or None], once looked up


def function(name: str) -> Any:
    """The C library's function `name`, or None where there is none (not glibc, not Linux)."""
    with _lock:
        if not _found:
            _found.append(_load())
        lib = _found[0]
    if lib is None:
        return None
    try:
        return getattr(lib, name)
    except AttributeError:
        return None


def _load() -> ctypes.CDLL | None:
    lib = _open(None)
    if lib is None:  # only then: find_library runs a subprocess
        lib = _open(ctypes.util.find_library("c") or "libc.so.6")
    return lib


def _open(path: str | None) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path, use_errno=True)
        getattr(lib, "malloc")  # a C library, not a bare executable's symbols
        return lib
    except (OSError, AttributeError, TypeError):
        return None


__all__ = ["function"]
