"""The worker's threads named for the operating system, so that `top -H`, `ps -T` and
`/proc/<pid>/task/*/comm` show which one spends the CPU.

Python names its threads for itself only: every thread of a worker showed as `python` (or
`celery`), and telling the inference thread's CPU from the consumer's or the results thread's
took `py-spy dump` to map thread ids to names (docs/benchmarks.md, "what bounds infer_many").
Each of the worker's own threads calls `name_os_thread` as it starts (pools through their
`initializer`). The main thread keeps the process's name: `ps` and `pgrep` show it.
"""

from __future__ import annotations

import ctypes
import threading

from . import libc

_PR_SET_NAME = 15  # linux/prctl.h
_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL


def name_os_thread(name: str | None = None) -> bool:
    """Give the calling thread's OS thread `name` (its Python name by default), cut to the 15
    bytes Linux keeps; False where that cannot be done (no Linux prctl). Never raises: a name
    is for people reading `top`, nothing depends on it."""
    prctl = libc.function("prctl")
    if prctl is None:
        return False
    text = name if name is not None else threading.current_thread().name
    # cut on a character's boundary: /proc and `ps` show the bytes as they are
    raw = text.encode("utf-8", "replace")[:_NAME_BYTES].decode("utf-8", "ignore").encode("utf-8")
    try:
        return prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
    except Exception:  # noqa: BLE001 - a name is for people only
        return False


__all__ = ["name_os_thread"]
