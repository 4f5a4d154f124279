"""The demo (`./scripts/demo`): the digits example (docs/quickstart.md; ModelMesh Serving's,
kserve/modelmesh-serving docs/predictors/README.md), end to end, then a short burst.

Starts a mesh on this machine (embedded Redis unless one is configured or answers on
127.0.0.1:6379), trains the digits SVM of ModelMesh Serving's example, registers it, sends
the example's input (the answer is 8), then measures a burst of concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from mesh import BatchingConfig, MeshClient, ModelInfo
from mesh.settings import MeshSettings
from mesh.store.context import StoreContext
from mesh.tools.examples import SEED_DIGITS_ANSWER, seed_digits_tensor, train_digits_svm
from mesh.tools.launcher import wait_for
from mesh.tools.local_stack import LocalStack

MODEL_ID = "example-mnist-isvc"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests in the burst")
    ap.add_argument("--producers", type=int, default=4, help="producer threads in the burst")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)

    prefix = f"demo{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        state = Path(tmp)
        print("starting the mesh ...", flush=True)
        with LocalStack(state_dir=state, prefix=prefix, workers=args.workers) as stack:
            print(f"  redis: {stack.redis_url}{' (embedded)' if stack.embedded else ''}")
            for p in stack.worker_procs():
                print(f"  worker: {p.full_name} (pid {p.pid})")
            try:
                return run(stack, state, args)
            finally:
                # a worker writes as it leaves (its models handed over, its departure in the
                # change log): deleting the mesh's keys before it stopped left those behind
                stack.stop_processes()
                _clean(stack.redis_url, prefix)


def run(stack: LocalStack, state: Path, args: argparse.Namespace) -> int:
    client = MeshClient(redis_url=stack.redis_url, prefix=stack.prefix)
    try:
        model_path = train_digits_svm(state / "mnist-svm.joblib")
        # the example policy of README.md and docs/batching.md: up to 32 per batch, the oldest waits at most 5 ms for company
        info = ModelInfo(runtime="sklearn", uri=f"file://{model_path}",
                         batching=BatchingConfig(max_batch_size=32, max_batch_delay_ms=5))
        status = client.register_model(MODEL_ID, info)
        print(f"\nregistered {MODEL_ID}: {status.state.value} ({status.serving_state})")

        request = seed_digits_tensor()
        t0 = time.perf_counter()
        response = client.infer(model_id=MODEL_ID, inputs=[request]).get(timeout=120)
        cold_ms = (time.perf_counter() - t0) * 1000
        print(f"\nrequest  {json.dumps(request)[:120]}...")
        print(f"response {json.dumps(response)}")
        answer = response["outputs"][0]["data"][0]
        print(f"\nanswer: {answer}   (first request, including the model load: {cold_ms:.0f} ms)")
        status = client.get_model_status(MODEL_ID)
        print(f"status: {status.state.value}, copies: {[c.worker for c in status.copies]}")
        if answer != SEED_DIGITS_ANSWER:
            print(f"UNEXPECTED: the example's answer is {SEED_DIGITS_ANSWER}")
            return 1
        burst(client, args.requests, args.producers)
        micro_batched(client, args.requests)
        return 0
    finally:
        client.close()


def burst(client: MeshClient, n: int, producers: int) -> None:
    before = {w.name: w for w in client.list_workers()}
    request = [seed_digits_tensor()]
    latencies: list[float] = []

    def one_producer(count: int) -> list[float]:
        sent = []
        for _ in range(count):
            sent.append((time.perf_counter(), client.infer(model_id=MODEL_ID, inputs=request)))
        done = []
        for t, r in sent:
            r.get(timeout=120)
            done.append(time.perf_counter() - t)
        return done

    print(f"\nburst: {n} requests from {producers} producer threads ...", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(producers) as pool:
        shares = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
        for part in pool.map(one_producer, shares):
            latencies.extend(part)
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def counted():
        after = {w.name: w for w in client.list_workers()}
        done = sum(w.requests_total - before[w.name].requests_total for w in after.values() if w.name in before)
        return after if done >= n else None

    after = wait_for(counted, timeout=15, what="heartbeats counting the burst")
    reqs = sum(w.requests_total - before[w.name].requests_total for w in after.values() if w.name in before)
    batches = sum(w.batches_total - before[w.name].batches_total for w in after.values() if w.name in before)
    print(f"  {n} answered in {elapsed:.2f} s: {n / elapsed:.0f} requests/s")
    print(f"  latency (enqueue to result, with the burst queued): p50 {latencies[n // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(n * 0.99) - 1] * 1000:.1f} ms")
    print(f"  worker batches: {batches}, mean batch size {reqs / max(1, batches):.1f}")


def micro_batched(client: MeshClient, n: int, per_message: int = 32) -> None:
    """The same requests sent 32 to a message with infer_many (docs/batching.md)."""
    request = [seed_digits_tensor()]
    print(f"\nmicro-batched: {n} requests, {per_message} per message (infer_many) ...", flush=True)
    t0 = time.perf_counter()
    handles = [client.infer_many(model_id=MODEL_ID, inputs=[request] * min(per_message, n - i))
               for i in range(0, n, per_message)]
    answers = [item for h in handles for item in h.get(timeout=120)["results"]]
    elapsed = time.perf_counter() - t0
    wrong = sum(1 for a in answers if a.get("outputs", [{}])[0].get("data") != [SEED_DIGITS_ANSWER])
    print(f"  {len(answers)} answered in {elapsed:.2f} s: {len(answers) / elapsed:.0f} requests/s"
          f"{'' if not wrong else f', {wrong} wrong'}")


def _clean(redis_url: str | None, prefix: str) -> None:
    if not redis_url:
        return
    ctx = StoreContext.from_settings(MeshSettings(prefix=prefix, redis_url=redis_url), redis_url)
    try:
        ctx.store.delete_all()
    except redis.RedisError:
        pass  # the embedded server is gone with its directory anyway
    finally:
        ctx.redis.close()


if __name__ == "__main__":
    raise SystemExit(main())
