"""`python -m bench <mode> [options]` (what `./scripts/bench` runs)."""

from __future__ import annotations

import importlib
import sys

MODES = {
    "batching": "bench.batching",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        print(f"usage: scripts/bench {{{'|'.join(MODES)}}} [options]  (--help per mode)")
        return 2
    mode = sys.argv.pop(1)
    sys.argv[0] = f"scripts/bench {mode}"
    return importlib.import_module(MODES[mode]).main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
