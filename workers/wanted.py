"""The workers' side of a restricted producer's cold path: model ids producers ask to load.

A producer whose Redis user may not place loads (docs/security.md, "Redis ACLs") pushes the id
of a model nobody serves or loads onto one list (`StateStore.want_load`); every worker waits on
it, and the one that pops an id routes and places the load as a producer would have
(`on_wanted`). An id is only a hint: a model served or loading by then, unregistered, or an id
that is not one, is dropped (a producer can ask for nothing it could not cause by sending a
request).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.protocol.ids import is_valid_id

from .threadnames import name_os_thread

if TYPE_CHECKING:
    from mesh.store.state import StateStore

log = logging.getLogger("mesh.worker.wanted")

WAIT_S = 1.0  # one BRPOP: how late the thread notices it should stop
BACKOFF_MAX_S = 5.0


class WantedLoads(threading.Thread):
    def __init__(self, store: StateStore, on_wanted: Callable[[str], object]) -> None:
        super().__init__(name="mesh-wanted", daemon=True)
        self.store = store
        self.on_wanted = on_wanted
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        name_os_thread()
        backoff = 0.1
        while not self._stop_requested.is_set():
            try:
                model_id = self.store.pop_wanted(WAIT_S)
                backoff = 0.1
            except Exception as exc:  # Redis away: keep trying, quietly
                log.warning("waiting for wanted loads failed: %s", exc)
                self._stop_requested.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if model_id is None:
                continue
            if not is_valid_id(model_id):
                log.warning("dropped a wanted load with an invalid model id %r", model_id[:80])
                continue
            try:
                self.on_wanted(model_id)
            except Exception as exc:  # one bad hint must not stop the others
                log.warning("placing a wanted load of %s failed: %s", model_id, exc)
