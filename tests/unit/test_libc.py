"""workers/libc.py: the C library looked up once, without a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers import libc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")


def test_functions_come_from_one_lookup_and_a_missing_one_is_none():
    assert libc.function("malloc_trim") is not None and libc.function("prctl") is not None
    assert libc.function("no_such_function_in_any_libc") is None
    assert len(libc._found) == 1 and libc._found[0] is not None


def test_the_lookup_runs_no_subprocess(monkeypatch):
    """find_library runs `ldconfig -p`: a fork from a worker full of threads, once per module."""
    monkeypatch.setattr(libc, "_found", [])
    spawned = []
    popen = subprocess.Popen.__init__

    def spy(self, *args, **kwargs):
        spawned.append(args)
        popen(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    assert libc.function("malloc") is not None
    assert spawned == []
