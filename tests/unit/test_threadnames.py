"""workers/threadnames.py: the worker's threads named for the OS (`top -H`, `ps -T`, /proc)."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workers.threadnames import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux names threads with prctl")


def comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().rstrip("\n")


def test_a_thread_gets_its_python_name_cut_to_what_linux_keeps():
    seen: dict[str, str] = {}

    def run() -> None:
        assert name_os_thread()
        seen["default"] = comm(threading.get_native_id())
        assert name_os_thread("mesh-é-a-much-longer-name")
        seen["long"] = comm(threading.get_native_id())
        assert name_os_thread("mesh-inferenc-ü")  # the 15th byte is half of the ü
        seen["cut"] = comm(threading.get_native_id())

    t = threading.Thread(target=run, name="mesh-inference")
    t.start()
    t.join()
    assert seen["default"] == "mesh-inference"
    assert seen["long"].encode() == "mesh-é-a-much-longer-name".encode()[:15]  # 15 bytes, é is two
    assert seen["cut"] == "mesh-inferenc-"
    assert comm(threading.get_native_id()) != "mesh-inference"  # only the calling thread


def test_a_pool_names_its_threads_through_its_initializer():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-results", initializer=name_os_thread) as pool:
        assert pool.submit(lambda: comm(threading.get_native_id())).result() == "mesh-results_0"
