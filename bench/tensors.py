"""`./scripts/bench tensors`: what a request's tensors cost each side, JSON numbers against raw.

In this process, no Redis, no worker: the parts of a request's path that depend on how its
tensors travel, timed alone (best of `--repeat` rounds, so the host's noise mostly drops out):

- producer: `encode_inputs` (or `infer_many`'s items) and the JSON text of the body;
- worker: the body's JSON decode (what Celery's Request does with a message) and the tensors'
  decode into arrays (`decode_inputs`; a micro-batch's alike items: `decode_stacked`).

Both forms side by side for each shape: MESH_RAW_TENSORS=false (JSON numbers) and the default
(`raw`, base64 of the bytes). The full request path is in `scripts/bench closedloop` and
`scripts/bench batching`.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable

import numpy as np

from bench.common import command_line, machine, save
from mesh.client import _many_items
from mesh.protocol import jsonwire
from mesh.protocol.tensors import decode_inputs, decode_stacked, encode_inputs
from mesh.tools.examples import SEED_DIGITS_INPUT, seed_digits_tensor


def _cases() -> dict[str, tuple[str, object]]:
    rng = np.random.default_rng(0)
    return {
        "digits row (1x64 FP32, the SVC's input as a V2 dict)": ("one", [seed_digits_tensor()]),
        "digits row (1x64 FP32 array)": ("one", np.asarray([SEED_DIGITS_INPUT], dtype=np.float32)),
        "infer_many: 32 digits rows as V2 dicts": ("many", [[seed_digits_tensor()]] * 32),
        "embedding batch (16x1024 FP32 array)": ("one", rng.standard_normal((16, 1024), dtype=np.float32)),
        "image (1x3x224x224 FP32 array)": ("one", rng.standard_normal((1, 3, 224, 224), dtype=np.float32)),
    }


def _best_us(fn: Callable[[], object], repeat: int, seconds: float = 0.2) -> float:
    fn()
    t = timeit.Timer(fn)
    n, _ = t.autorange()
    n = max(1, int(n * seconds / 0.2))
    return min(t.repeat(repeat=repeat, number=n)) / n * 1e6


def measure(kind: str, inputs: object, raw: bool, repeat: int) -> dict:
    if kind == "one":
        def encode():
            return {"inputs": encode_inputs(inputs, raw)}
    else:
        def encode():
            return {"items": _many_items(inputs, raw)}
    kwargs = encode()
    body = jsonwire.dumps([[], kwargs, {}])
    if kind == "one":
        def decode():
            return decode_inputs(jsonwire.loads(body)[1]["inputs"])
    else:
        def decode():
            return decode_stacked(jsonwire.loads(body)[1]["items"])
    return {
        "producer_us": _best_us(lambda: jsonwire.dumps([[], encode(), {}]), repeat),
        "worker_us": _best_us(decode, repeat),
        "body_bytes": len(body.encode("utf-8")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench tensors", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timing rounds per figure; the best counts")
    args = ap.parse_args(argv)
    results: dict = {"command": command_line("tensors", argv), "machine": machine(), "cases": {}}
    lines = ["| tensors | form | producer us | worker us | body bytes |", "|---|---|---:|---:|---:|"]
    for name, (kind, inputs) in _cases().items():
        row = {}
        for form, raw in (("JSON numbers", False), ("raw", True)):
            row[form] = m = measure(kind, inputs, raw, args.repeat)
            lines.append(f"| {name} | {form} | {m['producer_us']:.1f} | {m['worker_us']:.1f} | {m['body_bytes']:,} |")
        results["cases"][name] = row
        print(lines[-2], lines[-1], sep="\n", flush=True)
    print("\n" + "\n".join(lines))
    print(f"\nraw figures: {save('tensors', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
