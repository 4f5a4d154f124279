"""The `mesh` command line (typer + rich).

User errors print one line and exit with status 1 (2 for usage errors, typer's default);
never a traceback for something the user can fix.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MeshError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # errors are handled in main(): one line, no traceback
    help="Mesh: multi-model inference on Celery and Redis.",
)
models_app = typer.Typer(no_args_is_help=True, help="Register, inspect and remove concrete models.")
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)


def _client():
    from .client import MeshClient

    return MeshClient()


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


# ---------------------------------------------------------------------- processes
@app.command()
def up(
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="worker processes to start"),
    capacity: Optional[int] = typer.Option(None, help="bytes of models per worker (MESH_WORKER_CAPACITY_BYTES)"),
    flower_port: int = typer.Option(5555, help="Flower's port (0: no Flower)"),
    metrics_port: int = typer.Option(9101, help="first worker's Prometheus port; worker i uses +i (0: off)"),
    state_dir: Path = typer.Option(Path(".mesh"), help="logs and the embedded Redis's data"),
) -> None:
    """Start a mesh on this machine: Redis (embedded if none is configured), workers, Flower.

    Runs until Ctrl-C, then stops every process it started.
    """
    from .settings import get_settings
    from .stack import LocalStack

    stack = LocalStack(
        state_dir=state_dir.resolve(), prefix=get_settings().prefix, workers=workers,
        worker_capacity_bytes=capacity, flower_port=flower_port or None, persist=True,
        metrics_port=metrics_port or None,
        redis_url=get_settings().redis_url,
    )
    with console.status("starting the mesh ..."):
        stack.start()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        console.print(f"{'redis':<12}{stack.redis_url}{'  (embedded)' if stack.embedded else ''}")
        for p in stack.procs:
            console.print(f"{p.name:<12}pid {p.pid}  log {p.log_path}")
        if flower_port:
            console.print(f"{'flower':<12}http://127.0.0.1:{flower_port}")
        if metrics_port:
            for i, p in enumerate(stack.worker_procs()):
                console.print(f"{'metrics':<12}http://127.0.0.1:{metrics_port + i}/metrics  ({p.full_name})")
        console.print(f"\nexport MESH_REDIS_URL={stack.redis_url} MESH_PREFIX={stack.prefix}   # for other shells")
        console.print("Ctrl-C stops everything.")
        stopping.wait()
    finally:
        with console.status("stopping ..."):
            stack.stop()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    name: str = typer.Option("w1", help="worker name (Celery node name is NAME@host)"),
    capacity: Optional[int] = typer.Option(None, help="bytes of models (MESH_WORKER_CAPACITY_BYTES)"),
) -> None:
    """Run one mesh worker in the foreground (extra arguments go to `celery worker`)."""
    from .launcher import worker_command

    if capacity:
        os.environ["MESH_WORKER_CAPACITY_BYTES"] = str(capacity)
    argv = worker_command(name) + list(ctx.args)
    os.execv(argv[0], argv)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(ctx: typer.Context) -> None:
    """Run the beat scheduler in the foreground (extra arguments go to `celery beat`)."""
    argv = [sys.executable, "-m", "celery", "-A", "mesh.app", "beat", "--loglevel", "INFO", *ctx.args]
    os.execv(argv[0], argv)


# ---------------------------------------------------------------------- models
@models_app.command("list")
def models_list() -> None:
    """Every registered model with its state and copies."""
    with _client() as c:
        table = Table("model", "runtime", "state", "copies", "uri")
        for rec in c.list_models():
            st = c.get_model_status(rec.model_id)
            table.add_row(rec.model_id, rec.info.runtime, f"{st.state.value} ({st.serving_state})",
                          str(len(st.copies)), rec.info.uri)
        console.print(table)


@models_app.command("register")
def models_register(
    model_id: str,
    uri: str = typer.Option(..., help="file:///path/to/model"),
    runtime: str = typer.Option(..., help="sklearn | onnx | python"),
    max_batch_size: Optional[int] = typer.Option(None),
    max_batch_delay_ms: Optional[float] = typer.Option(None),
    python_class: Optional[str] = typer.Option(None, help="for runtime python: package.module:Class"),
    load_now: bool = typer.Option(False, help="load a copy now"),
    sync: bool = typer.Option(False, help="with --load-now, wait until loaded"),
) -> None:
    """Register a concrete model (idempotent with identical settings)."""
    from .models import BatchingConfig, ModelInfo

    batching = None
    if max_batch_size is not None or max_batch_delay_ms is not None:
        batching = BatchingConfig(max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms)
    info = ModelInfo(runtime=runtime, uri=uri, batching=batching, python_class=python_class)
    with _client() as c:
        st = c.register_model(model_id, info, load_now=load_now, sync=sync)
        console.print(f"{model_id}: {st.state.value} ({st.serving_state})")


@models_app.command("unregister")
def models_unregister(model_id: str) -> None:
    """Remove a model and unload its copies (idempotent)."""
    with _client() as c:
        c.unregister_model(model_id)
        console.print(f"{model_id}: unregistered")


@models_app.command("status")
def models_status(model_id: str) -> None:
    """A model's state, copies, failed copies and errors (newest first)."""
    with _client() as c:
        st = c.get_model_status(model_id)
        console.print(f"[bold]{model_id}[/bold]  {st.state.value} ({st.serving_state})")
        for cp in st.copies:
            console.print(f"  copy    {cp.worker:<30} {cp.state.value}")
        for f in st.failed_copies:
            console.print(f"  failed  {f.worker:<30} {f.error}")


@app.command()
def workers() -> None:
    """Live workers: capacity, used bytes, loaded models, request rate."""
    with _client() as c:
        table = Table("worker", "used / capacity", "models", "req/s", "requests", "mean batch", "state")
        for w in c.list_workers():
            table.add_row(
                w.name, f"{w.used_bytes / 2**20:.1f} / {w.capacity_bytes / 2**20:.0f} MiB",
                ", ".join(m.model_id for m in w.models) or "-", f"{w.request_rate:.1f}",
                str(w.requests_total), f"{w.mean_batch_size:.1f}",
                "shutting down" if w.shutting_down else "up",
            )
        console.print(table)


@app.command()
def infer(
    target: str = typer.Argument(..., help="model id (or vmodel id with --vmodel)"),
    inputs: Path = typer.Argument(..., help="a .json file of V2 input tensors, or a .npy array"),
    vmodel: bool = typer.Option(False, "--vmodel", help="TARGET is a vmodel id"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the answer"),
) -> None:
    """Send one inference request and print the V2 response."""
    import numpy as np

    if not inputs.exists():
        _fail(f"no such file: {inputs}")
    if inputs.suffix == ".npy":
        payload = np.load(inputs, allow_pickle=False)
    else:
        try:
            payload = json.loads(inputs.read_text())
        except json.JSONDecodeError as exc:
            _fail(f"{inputs} is not JSON: {exc}")
        if isinstance(payload, dict) and "inputs" in payload:
            payload = payload["inputs"]
    with _client() as c:
        kw = {"vmodel_id": target} if vmodel else {"model_id": target}
        response = c.infer(inputs=payload, **kw).get(timeout=timeout)
        console.print_json(json.dumps(response))


def main() -> None:
    from celery.exceptions import TimeoutError as ResultTimeout
    from pydantic import ValidationError
    from redis import RedisError

    try:
        app()
    except MeshError as exc:
        err.print(f"[red]error:[/red] {exc.code}: {exc}", highlight=False)
        sys.exit(1)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        err.print(f"[red]error:[/red] invalid {where}: {first.get('msg')}", highlight=False)
        sys.exit(1)
    except ResultTimeout as exc:
        err.print(f"[red]error:[/red] no answer in time: {exc}", highlight=False)
        sys.exit(1)
    except (RedisError, OSError) as exc:
        err.print(f"[red]error:[/red] cannot reach Redis or a file: {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
