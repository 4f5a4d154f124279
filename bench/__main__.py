"""`python -m bench <mode> [options]` (what `./scripts/bench` runs)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time

MODES = {
    "batching": "bench.batching",
    "multimodel": "bench.multimodel",
    "coldstart": "bench.coldstart",
    "cutover": "bench.cutover",
    "overhead": "bench.overhead",
    "plot": "bench.plot",
    "closedloop": "bench.closedloop",
    "coldpath": "bench.coldpath",  # the producer side of a cold request, no worker
    "tensors": "bench.tensors",  # what tensors cost each side, JSON numbers against raw, in-process
    "intake": "bench.intake",  # a consumer's CPU per message by queues consumed, no worker
    "loadcost": "bench.loadcost",  # a load's worker CPU, plain Celery and mesh
    "planner": "bench.planner_tick",  # a scheduler tick against Redis at 100,000 models
    "gateway": "bench.gateway",  # not in `all` yet: figures to be recorded in docs/benchmarks.md
    "soak": "bench.soak",  # not in `all`: ten minutes by default (docs/reliability.md)
}
# `all`: every mode with its defaults, in this order (docs/benchmarks.md records the figures)
ALL = ["batching", "multimodel", "coldstart", "cutover", "overhead", "plot"]


def run_all() -> int:
    took = {}
    for mode in ALL:
        print(f"\n######## scripts/bench {mode}", flush=True)
        started = time.monotonic()
        rc = importlib.import_module(MODES[mode]).main([])
        took[mode] = time.monotonic() - started
        if rc:
            print(f"scripts/bench {mode} failed ({rc})")
            return rc
    print("\n" + ", ".join(f"{m} {s:.0f} s" for m, s in took.items()) + f"; total {sum(took.values()):.0f} s")
    return 0


def main() -> int:
    # The benchmarks' workers get a disk cache of their own (downloads, reload snapshots of
    # the models each run creates), removed afterwards, not the user's ~/.cache/mesh.
    if "MESH_DISK_CACHE_DIR" not in os.environ:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-cache-") as cache:
            os.environ["MESH_DISK_CACHE_DIR"] = cache
            try:
                return _main()
            finally:
                del os.environ["MESH_DISK_CACHE_DIR"]
    return _main()


def _main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in (*MODES, "all"):
        print(f"usage: scripts/bench {{{'|'.join([*MODES, 'all'])}}} [options]  (--help per mode)")
        return 2
    mode = sys.argv.pop(1)
    sys.argv[0] = f"scripts/bench {mode}"
    if mode == "all":
        return run_all()
    return importlib.import_module(MODES[mode]).main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
