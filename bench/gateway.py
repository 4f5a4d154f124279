"""`./scripts/bench gateway`: what the gateway adds over MeshClient, in the same run.

One mesh worker, the digits SVM loaded, and a `mesh gateway` process. Two measurements, each
for MeshClient (in this process) and for the gateway (tritonclient, the usual KServe V2
client, in this process, over gRPC; and REST for latency):

- latency at one client: `--requests` sequential requests, p50/p99; the gateway's added
  latency is its p50 minus MeshClient's;
- throughput at `--clients` (16) concurrent clients: each an asyncio task sending its
  requests back to back (`MeshClient.infer_async`; tritonclient.grpc.aio), requests/s over
  `--requests` x clients requests.

The worker batches either way; the gateway's own cost is the extra hop (gRPC in, V2 decode and
encode, a MeshClient inside it) and its process's CPU, on the same cores here.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import clean, command_line, latency_summary, machine, redis_for_bench, save
from mesh import MeshClient, ModelInfo
from mesh.tools.examples import SEED_DIGITS_INPUT, seed_digits_tensor, train_digits_svm
from mesh.tools.launcher import start_gateway, start_worker, wait_gateway_ready, wait_worker_ready


def _sequential(call, n: int) -> dict:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    return latency_summary(lat)


async def _concurrent(make_call, clients: int, per_client: int) -> dict:
    async def one(call) -> None:
        for _ in range(per_client):
            await call()

    calls = [make_call() for _ in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls))
    took = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * per_client, "seconds": took,
            "requests_per_s": clients * per_client / took}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500, help="sequential requests, and requests per client")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)

    import tritonclient.grpc as tg
    import tritonclient.grpc.aio as tga
    import tritonclient.http as th

    seed = np.asarray([SEED_DIGITS_INPUT], dtype=np.float32)
    results: dict = {"command": command_line("gateway", argv), "machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-gw-") as tmp:
        tmpdir = Path(tmp)
        path = train_digits_svm(tmpdir / "svm.joblib")
        with redis_for_bench(tmpdir) as url:
            prefix = f"benchgw{time.monotonic_ns()}"
            env = {"MESH_REDIS_URL": url, "MESH_PREFIX": prefix}
            worker = start_worker("gw", env, tmpdir / "logs", loglevel="WARNING")
            gateway = start_gateway({**env, "MESH_GATEWAY_GRPC_PORT": "0", "MESH_GATEWAY_HTTP_PORT": "0"}, tmpdir / "logs")
            client = MeshClient(redis_url=url, prefix=prefix)
            try:
                wait_worker_ready(url, prefix, worker.full_name, timeout=60, proc=worker)
                ports = wait_gateway_ready(gateway, timeout=60)
                grpc_url, http_url = f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['http']}"
                client.register_model("m", ModelInfo(runtime="sklearn", uri=f"file://{path}"))
                client.ensure_loaded("m", sync=True, timeout=60)

                def mesh_call() -> None:
                    client.infer(model_id="m", inputs=[seed_digits_tensor()]).get(timeout=60)

                g = tg.InferenceServerClient(grpc_url)
                gin = tg.InferInput("predict", [1, 64], "FP32")
                gin.set_data_from_numpy(seed)

                def grpc_call() -> None:
                    g.infer("m", [gin])

                h = th.InferenceServerClient(http_url)
                hin = th.InferInput("predict", [1, 64], "FP32")
                hin.set_data_from_numpy(seed)

                def http_call() -> None:
                    h.infer("m", [hin])

                for call in (mesh_call, grpc_call, http_call):
                    _sequential(call, args.warmup)
                results["latency_1_client"] = {
                    "meshclient": _sequential(mesh_call, args.requests),
                    "gateway_grpc": _sequential(grpc_call, args.requests),
                    "gateway_http": _sequential(http_call, args.requests),
                }
                lat = results["latency_1_client"]
                results["added_p50_ms"] = {
                    k: lat[k]["p50_ms"] - lat["meshclient"]["p50_ms"] for k in ("gateway_grpc", "gateway_http")
                }
                g.close()
                h.close()

                async def throughput() -> dict:
                    def mesh_async():
                        return lambda: client.infer_async(model_id="m", inputs=[seed_digits_tensor()])

                    aio = tga.InferenceServerClient(grpc_url)
                    ain = tga.InferInput("predict", [1, 64], "FP32")
                    ain.set_data_from_numpy(seed)

                    def grpc_async():
                        return lambda: aio.infer("m", [ain])

                    out = {
                        "meshclient": await _concurrent(mesh_async, args.clients, args.requests),
                        "gateway_grpc": await _concurrent(grpc_async, args.clients, args.requests),
                    }
                    await aio.close()
                    return out

                results["throughput"] = asyncio.run(throughput())
            finally:
                client.close()
                gateway.stop()
                worker.stop()
                clean(url, prefix)
    lat, tp = results["latency_1_client"], results["throughput"]
    print(f"latency at 1 client, p50 / p99 ms ({args.requests} requests):")
    for k, v in lat.items():
        print(f"  {k:<14}{v['p50_ms']:8.2f} {v['p99_ms']:8.2f}")
    print(f"  added by the gateway (p50): gRPC {results['added_p50_ms']['gateway_grpc']:.2f} ms, "
          f"HTTP {results['added_p50_ms']['gateway_http']:.2f} ms")  # fmt: skip
    print(f"throughput at {args.clients} clients:")
    for k, v in tp.items():
        print(f"  {k:<14}{v['requests_per_s']:8.0f} requests/s")
    out = save("gateway", results)
    print(f"\nraw figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
