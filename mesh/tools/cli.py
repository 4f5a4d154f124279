"""The `mesh` command line (typer + rich).

User errors print one line (`error: <reason>`) on stderr and exit with status 1 (2 for usage
errors); never a traceback for something the user can fix. MESH_DEBUG=1 shows the traceback
of an unexpected error. Output meant for people goes to stdout; progress displays and errors
go to stderr, so `mesh infer ... > answer.json` stays clean.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mesh.errors import MeshError
from mesh.tools.display import cell_len, ljust_cells, visible

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.models import ModelInfo, ModelStatus, VModelStatus

T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # errors are handled in main(): one line, no traceback
    help="Mesh: multi-model inference on Celery and Redis.",
)
models_app = typer.Typer(no_args_is_help=True, help="Register, inspect and remove concrete models.")
vmodels_app = typer.Typer(no_args_is_help=True, help="VModels: aliases with a zero-downtime cutover.")
repository_app = typer.Typer(no_args_is_help=True, help="The model repository (MESH_MODEL_DIR).")
app.add_typer(models_app, name="models")
app.add_typer(vmodels_app, name="vmodels")
app.add_typer(repository_app, name="repository")
dead_letters_app = typer.Typer(
    no_args_is_help=True,
    help="Messages delivered MESH_MAX_DELIVERIES times whose workers died or stalled each time.",
)
app.add_typer(dead_letters_app, name="dead-letters")

# markup=False: ids, paths and error messages are printed as they are ("[...]" is not a style)
console = Console(markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)  # soft_wrap: an error stays one line

#: Where `mesh up` keeps its logs and the embedded Redis (and the file naming that Redis).
STATE_DIR = Path(".mesh")
REDIS_URL_FILE = "redis.url"


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


# ---------------------------------------------------------------------- helpers
def _discover_redis() -> None:
    """Let commands find the Redis of a `mesh up` started in this directory.

    Only when MESH_REDIS_URL is unset and nothing answers on 127.0.0.1:6379: `mesh up` then
    ran an embedded redis-server on a free port and wrote its URL to .mesh/redis.url.
    """
    if os.environ.get("MESH_REDIS_URL"):
        return
    from mesh.broker.redis_url import DEFAULT_LOCAL_URL, probe

    url_file = Path(os.environ.get("MESH_STATE_DIR", STATE_DIR)) / REDIS_URL_FILE
    try:
        url = url_file.read_text().strip()
    except OSError:
        return
    if url and not probe(DEFAULT_LOCAL_URL) and probe(url):
        os.environ["MESH_REDIS_URL"] = url


def _client() -> MeshClient:
    _discover_redis()
    from mesh.client import MeshClient

    return MeshClient()


def _fail(message: str) -> None:
    raise UserError(message)


def _print_error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False)


def safe_url(url: str) -> str:
    """A Redis URL with its password masked (for printing)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


_STATE_STYLE = {
    "Loaded": "green",
    "Loading": "cyan",
    "Standby": "dim",
    "FailedToLoad": "red",
    "Pending": "yellow",
    "UpToDate": "green",
    "InProgress": "cyan",
    "BlockedByFailedLoad": "red",
}


def _styled(word: str | None) -> Text:
    word = word or "-"
    return Text(word, style=_STATE_STYLE.get(word, ""))


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _wait_with_progress(
    work: Callable[[], T],
    poll: Callable[[], tuple[str, int, int]],
    interval: float = 0.25,
) -> T:
    """Run `work` (a blocking library call: a sync load or cutover) in a thread and show a
    progress bar until it returns. `poll()` gives (description, done, total) from Redis.

    The library call does the waiting and its error handling; the display only reads.
    Ctrl-C stops waiting, not the load: it goes on in the mesh.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    if not err.is_terminal:  # a log or a pipe: no animation, one line at the end
        started = time.monotonic()
        try:
            return work()
        finally:
            try:
                what, done, total = poll()
                err.print(f"{what}: {done}/{max(total, 1)} in {time.monotonic() - started:.1f}s", highlight=False)
            except Exception:
                pass
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="mesh-cli-wait", daemon=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
               MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("starting ...", total=1)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(interval)
                try:
                    what, done, total = poll()
                except Exception:  # a display glitch (e.g. Redis blip) must not end the wait
                    continue
                progress.update(task, description=what, completed=done, total=max(total, 1))
            what, done, total = poll()
            progress.update(task, description=what, completed=done, total=max(total, 1))
        except KeyboardInterrupt:
            progress.stop()
            raise UserError("interrupted: stopped waiting (the mesh goes on with it)") from None
    if "error" in box:
        raise box["error"]
    return box["result"]


def _model_info(
    uri: Optional[str],
    runtime: Optional[str],
    storage_key: Optional[str],
    python_class: Optional[str],
    max_batch_size: Optional[int],
    max_batch_delay_ms: Optional[float],
    min_copies: Optional[int],
    max_copies: Optional[int],
    size_bytes: Optional[int],
    required_labels: Optional[str] = None,
) -> ModelInfo | None:
    """A ModelInfo from the shared command-line options; None when no --uri/--runtime."""
    from mesh.models import BatchingConfig, ModelInfo

    extras = {
        "--storage-key": storage_key, "--python-class": python_class, "--max-batch-size": max_batch_size,
        "--max-batch-delay-ms": max_batch_delay_ms, "--min-copies": min_copies,
        "--max-copies": max_copies, "--size-bytes": size_bytes, "--required-labels": required_labels,
    }  # fmt: skip
    if uri is None and runtime is None:
        given = [k for k, v in extras.items() if v is not None]
        if given:
            _fail(f"{', '.join(given)} describe a model to register: give --uri and --runtime too")
        return None
    if uri is None or runtime is None:
        _fail("--uri and --runtime go together")
    batching = None
    if max_batch_size is not None or max_batch_delay_ms is not None:
        batching = BatchingConfig(max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms)
    labels = None
    if required_labels is not None:
        from mesh.protocol.labels import parse_labels

        try:
            labels = parse_labels(required_labels, "--required-labels")
        except ValueError as exc:
            _fail(str(exc))
    return ModelInfo(
        runtime=runtime, uri=uri, storage_key=storage_key, batching=batching, python_class=python_class,
        min_copies=min_copies, max_copies=max_copies, size_bytes=size_bytes, required_labels=labels,
    )  # fmt: skip


# Options shared by `models register` and `vmodels set` (a model described on the command line).
_URI = typer.Option(None, "--uri", help="file:///abs/path, s3://bucket/key, or a path in --storage-key's bucket")
_RUNTIME = typer.Option(None, "--runtime", help="sklearn | onnx | python | xgboost | lightgbm | tensorflow")
_STORAGE_KEY = typer.Option(None, "--storage-key", help="MESH_STORAGE_CONFIG entry with the credentials")
_PYTHON_CLASS = typer.Option(None, "--python-class", help="for runtime python: package.module:Class")
_MAX_BATCH = typer.Option(None, "--max-batch-size", min=1, help="per-model max batch size")
_MAX_DELAY = typer.Option(None, "--max-batch-delay-ms", min=0, help="per-model max batch delay (ms)")
_MIN_COPIES = typer.Option(None, "--min-copies", min=0, help="copies kept loaded at all times (pinning)")
_MAX_COPIES = typer.Option(None, "--max-copies", min=1, help="most copies the scheduler scales to")
_SIZE = typer.Option(None, "--size-bytes", min=1, help="size hint for placement before the first load")
_LABELS = typer.Option(
    None, "--required-labels", help="labels a worker must carry to hold it (MESH_WORKER_LABELS), e.g. env=sklearn-1.5,zone=a"
)


# ---------------------------------------------------------------------- processes
@app.command()
def up(
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="worker processes to start"),
    capacity: Optional[int] = typer.Option(None, help="bytes of models per worker (MESH_WORKER_CAPACITY_BYTES)"),
    beat: bool = typer.Option(True, "--beat/--no-beat", help="run the beat scheduler (rebalancing, cutovers, repository sync)"),
    flower_port: int = typer.Option(5555, help="Flower's port (0: no Flower)"),
    metrics_port: int = typer.Option(9101, help="first worker's Prometheus port; worker i uses +i (0: off)"),
    exporter_port: Optional[int] = typer.Option(
        None, help="port of the mesh's signals (`mesh exporter`, served by this process; 0: off) "
        "[default: MESH_EXPORTER_PORT, 9808]"),
    gateway: bool = typer.Option(True, "--gateway/--no-gateway", help="run the gateway (KServe V2 gRPC/HTTP, ModelMesh's management API)"),
    state_dir: Path = typer.Option(STATE_DIR, help="logs and the embedded Redis's data"),
) -> None:
    """Start a mesh on this machine: Redis (embedded if none is configured), workers, beat, Flower,
    the gateway (ports MESH_GATEWAY_GRPC_PORT / MESH_GATEWAY_HTTP_PORT, on MESH_GATEWAY_HOST).

    Runs until Ctrl-C, then stops every process it started.
    """
    from mesh.settings import get_settings
    from mesh.tools.local_stack import LocalStack

    state_dir = state_dir.resolve()
    # Flower sends tasks and controls workers: never without a login, even on loopback (a web
    # page in the local browser could POST to it otherwise); a generated one, shown once
    flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"admin:{secrets.token_urlsafe(12)}"
    stack = LocalStack(
        state_dir=state_dir, prefix=get_settings().prefix, workers=workers, flower_auth=flower_auth,
        worker_capacity_bytes=capacity, beat=beat, flower_port=flower_port or None, persist=True,
        metrics_port=metrics_port or None, redis_url=get_settings().redis_url,
        gateway=(get_settings().gateway_grpc_port, get_settings().gateway_http_port) if gateway else None,
    )  # fmt: skip
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    url_file = state_dir / REDIS_URL_FILE
    try:
        with err.status("starting the mesh ..."):
            stack.start()
        assert stack.redis_url is not None
        if stack.embedded:
            url_file.write_text(stack.redis_url + "\n")  # for `mesh ...` in other shells here
        console.print(f"{'redis':<12}{safe_url(stack.redis_url)}{'  (embedded)' if stack.embedded else ''}")
        for p in stack.procs:
            console.print(f"{p.name:<12}pid {p.pid}  log {p.log_path}")
        if flower_port:
            login = ("FLOWER_BASIC_AUTH's login" if os.environ.get("FLOWER_BASIC_AUTH")
                     else "login {} / {}  (generated, shown once; FLOWER_BASIC_AUTH=user:password sets yours)"
                     .format(*flower_auth.split(":", 1)))  # fmt: skip
            console.print(f"{'flower':<12}http://127.0.0.1:{flower_port}  {login}")
        if stack.gateway_ports:
            host = get_settings().gateway_host
            http = stack.gateway_ports.get("http")
            console.print(f"{'gateway':<12}grpc {host}:{stack.gateway_ports['grpc']}"
                          + (f"  http http://{host}:{http}/v2" if http else "") + "  (docs/gateway.md)")  # fmt: skip
        if metrics_port:
            for i, p in enumerate(stack.worker_procs()):
                console.print(f"{'metrics':<12}http://127.0.0.1:{metrics_port + i}/metrics  ({p.full_name})")
        exporter_port = get_settings().exporter_port if exporter_port is None else exporter_port
        if exporter_port:
            bound = _serve_exporter(stack.redis_url, exporter_port)
            if bound:
                console.print(f"{'signals':<12}http://{bound[0]}:{bound[1]}/metrics  (mesh exporter)")
        if stack.embedded:
            console.print(f"\nmesh commands run in {Path.cwd()} find this Redis; elsewhere:")
        console.print(f"export MESH_REDIS_URL={safe_url(stack.redis_url)} MESH_PREFIX={stack.prefix}")
        console.print("Ctrl-C stops everything.")
        while not stopping.wait(1.0):
            dead = [p for p in stack.procs if not p.alive()]
            if dead:
                _print_error(f"{dead[0].name} exited (log {dead[0].log_path}); stopping")
                raise typer.Exit(1)
    finally:
        count, embedded = len(stack.procs), stack.embedded is not None
        with err.status("stopping ..."):
            stack.stop()
        url_file.unlink(missing_ok=True)
        kept = f" and the embedded Redis (its data stays in {state_dir / 'redis'})" if embedded else ""
        err.print(f"stopped {count} processes{kept}", highlight=False)


def _store_context(c: MeshClient) -> Any:
    from mesh.store.context import StoreContext

    return StoreContext(settings=c.settings, redis=c.store.r, keys=c.keys, store=c.store)


def _serve_exporter(redis_url: str, port: int) -> tuple[str, int] | None:
    """The exporter in this process (`mesh up`): a thread, not one more process; a taken port
    is reported and the stack runs on without it."""
    from mesh.settings import MeshSettings, get_settings
    from mesh.store.context import StoreContext
    from mesh.tools.exporter import serve

    s = get_settings()
    ctx = StoreContext.from_settings(MeshSettings(prefix=s.prefix, redis_url=redis_url), redis_url)
    try:
        _server, bound = serve(ctx, addr=s.exporter_addr, port=port, top_n=s.signals_top_n,
                               min_interval_s=s.signals_min_interval_s, top_pools=s.signals_top_pools)  # fmt: skip
    except OSError as exc:
        _print_error(f"mesh exporter not started on {s.exporter_addr}:{port}: {exc}")
        return None
    return s.exporter_addr, bound


@app.command()
def exporter(
    port: Optional[int] = typer.Option(None, help="port to serve /metrics on [default: MESH_EXPORTER_PORT, 9808]"),
    addr: Optional[str] = typer.Option(None, help="address to bind [default: MESH_EXPORTER_ADDR, 127.0.0.1]"),
    top: Optional[int] = typer.Option(None, "--top", min=0, help="models with per-model series [default: MESH_SIGNALS_TOP_N, 50]"),
) -> None:
    """Serve the mesh's autoscaling signals (Prometheus text on /metrics): pending requests and
    the age of the oldest per model (top N by pending) and in total, loaded copies, bytes of
    models wanted against the workers' capacity, in total and per worker pool. Runs until Ctrl-C."""
    from mesh.settings import get_settings
    from mesh.tools.exporter import serve

    _discover_redis()
    s = get_settings()
    with _client() as c:
        ctx = _store_context(c)
        bind = addr or s.exporter_addr
        try:
            server, bound = serve(ctx, addr=bind, port=s.exporter_port if port is None else port,
                                  top_n=s.signals_top_n if top is None else top,
                                  min_interval_s=s.signals_min_interval_s, top_pools=s.signals_top_pools)  # fmt: skip
        except OSError as exc:
            _fail(f"cannot serve on {bind}:{port if port is not None else s.exporter_port}: {exc}")
        err.print(f"mesh exporter: http://{bind}:{bound}/metrics (prefix {s.prefix}); Ctrl-C stops it", highlight=False)
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        while not stopping.wait(1.0):
            pass
        server.shutdown()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    name: str = typer.Option("w1", help="worker name (Celery node name is NAME@host)"),
    capacity: Optional[int] = typer.Option(None, help="bytes of models (MESH_WORKER_CAPACITY_BYTES)"),
) -> None:
    """Run one mesh worker in the foreground (extra arguments go to `celery worker`)."""
    from mesh.tools.launcher import worker_command

    _discover_redis()
    if capacity:
        os.environ["MESH_WORKER_CAPACITY_BYTES"] = str(capacity)
    argv = worker_command(name) + list(ctx.args)
    os.execv(argv[0], argv)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(ctx: typer.Context) -> None:
    """Run the beat scheduler in the foreground (extra arguments go to `celery beat`)."""
    _discover_redis()
    argv = [sys.executable, "-m", "celery", "-A", "mesh.app", "beat", "--loglevel", "INFO", *ctx.args]
    os.execv(argv[0], argv)


@app.command()
def gateway(
    host: Optional[str] = typer.Option(None, help="address to bind (MESH_GATEWAY_HOST, default 127.0.0.1)"),
    grpc_port: Optional[int] = typer.Option(None, help="KServe V2 gRPC + ModelMesh management (MESH_GATEWAY_GRPC_PORT, 8033)"),
    http_port: Optional[int] = typer.Option(None, help="KServe V2 REST (MESH_GATEWAY_HTTP_PORT, 8008; -1: none)"),
) -> None:
    """Serve KServe V2 (gRPC and HTTP) and ModelMesh's management API until Ctrl-C.

    A producer like MeshClient: it needs the mesh's Redis and serves the management API
    without a login of its own (docs/security.md), hence 127.0.0.1 unless told otherwise.
    """
    import logging

    from mesh.gateway.server import run
    from mesh.settings import MeshSettings

    _discover_redis()
    overrides = {k: v for k, v in {"gateway_host": host, "gateway_grpc_port": grpc_port,
                                   "gateway_http_port": http_port}.items() if v is not None}  # fmt: skip
    settings = MeshSettings(**overrides)
    # force: main() gave the root logger a NullHandler; a server's log is its output
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    run(settings, announce=lambda line: print(line, flush=True))


# ---------------------------------------------------------------------- models
def _load_poll(client: MeshClient, model_id: str) -> Callable[[], tuple[str, int, int]]:
    def poll() -> tuple[str, int, int]:
        st = client.get_model_status(model_id)
        loaded = sum(1 for c in st.copies if c.state.value == "LOADED")
        where = ", ".join(c.worker for c in st.copies) or "placing"
        return f"{model_id}: {st.serving_state} ({where})", loaded, max(1, len(st.copies))

    return poll


def _print_model_status(model_id: str, st: ModelStatus) -> None:
    console.print(Text.assemble((visible(model_id), "bold"), "  ", _styled(st.serving_state), f"  ({st.state.value})"))
    # worker names padded to one display width (at least 32), so the columns after them line up
    width = max([32] + [cell_len(visible(c.worker)) for c in [*st.copies, *st.failed_copies]])
    for cp in st.copies:
        console.print(f"  copy    {ljust_cells(visible(cp.worker), width)} {cp.state.value:<8} since {_ago(cp.since)}")
    for f in st.failed_copies:
        console.print(f"  failed  {ljust_cells(visible(f.worker), width)} {_ago(f.time)}: {f.error}",
                      highlight=False, soft_wrap=True)  # fmt: skip
    for e in st.errors[:3]:
        if not any(e == f.error for f in st.failed_copies):
            console.print(f"  error   {e}", highlight=False, soft_wrap=True)
    if st.reason:
        console.print(f"  reason  {st.reason}", highlight=False, soft_wrap=True)


@models_app.command("list")
def models_list() -> None:
    """Every registered model with its state and copies."""
    with _client() as c:
        table = Table("model", "runtime", "state", "copies", "refs", "uri")
        for rec in c.list_models():
            st = c.get_model_status(rec.model_id)
            table.add_row(visible(rec.model_id), rec.info.runtime, _styled(st.serving_state),
                          str(len(st.copies)), str(rec.refs), rec.info.uri)  # fmt: skip
        console.print(table)


@models_app.command("register")
def models_register(
    model_id: str = typer.Argument(..., help="the concrete model's id"),
    uri: str = typer.Option(..., "--uri", help="file:///abs/path, s3://bucket/key, or a path in --storage-key's bucket"),
    runtime: str = typer.Option(..., "--runtime", help="sklearn | onnx | python | xgboost | lightgbm | tensorflow"),
    storage_key: Optional[str] = _STORAGE_KEY,
    python_class: Optional[str] = _PYTHON_CLASS,
    max_batch_size: Optional[int] = _MAX_BATCH,
    max_batch_delay_ms: Optional[float] = _MAX_DELAY,
    min_copies: Optional[int] = _MIN_COPIES,
    max_copies: Optional[int] = _MAX_COPIES,
    size_bytes: Optional[int] = _SIZE,
    required_labels: Optional[str] = _LABELS,
    load_now: bool = typer.Option(False, "--load-now", help="load a copy now"),
    sync: bool = typer.Option(False, "--sync", help="with --load-now, wait until it is loaded (progress shown)"),
    timeout: float = typer.Option(120.0, help="seconds --sync waits"),
) -> None:
    """Register a concrete model (idempotent with identical settings)."""
    info = _model_info(uri, runtime, storage_key, python_class, max_batch_size, max_batch_delay_ms,
                       min_copies, max_copies, size_bytes, required_labels)  # fmt: skip
    if sync and not load_now:
        _fail("--sync waits for the load of --load-now: give both")
    with _client() as c:
        if sync:
            st = _wait_with_progress(
                lambda: c.register_model(model_id, info, load_now=True, sync=True, timeout=timeout),
                _load_poll(c, model_id),
            )
        else:
            st = c.register_model(model_id, info, load_now=load_now)
        _print_model_status(model_id, st)
        if st.state.value == "LOADING_FAILED":
            _fail(f"{model_id} failed to load: {st.errors[0] if st.errors else 'see mesh models status'}")


@models_app.command("unregister")
def models_unregister(model_id: str) -> None:
    """Remove a model and unload its copies (idempotent)."""
    with _client() as c:
        c.unregister_model(model_id)
        console.print(f"{model_id}: unregistered")


@models_app.command("load")
def models_load(
    model_id: str,
    timeout: float = typer.Option(120.0, help="seconds to wait"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until loaded (progress shown)"),
) -> None:
    """Load a copy of a registered model if it has none (ModelMesh's ensureLoaded)."""
    with _client() as c:
        if wait:
            st = _wait_with_progress(lambda: c.ensure_loaded(model_id, sync=True, timeout=timeout), _load_poll(c, model_id))
        else:
            st = c.ensure_loaded(model_id)
        _print_model_status(model_id, st)
        if st.state.value == "LOADING_FAILED":
            _fail(f"{model_id} failed to load: {st.errors[0] if st.errors else 'see mesh models status'}")


@models_app.command("status")
def models_status(
    model_id: str,
    config: bool = typer.Option(False, "--config", help="also show the effective per-model settings and their source"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """A model's state, copies, failed copies and errors (newest first)."""
    with _client() as c:
        st = c.get_model_status(model_id)
        if st.state.value == "NOT_FOUND":
            _fail(f"model {model_id!r} not found")
        cfg = c.get_effective_config(model_id) if config else None
        if as_json:
            data = st.model_dump(mode="json")
            if cfg is not None:
                data["config"] = cfg.model_dump(mode="json")["values"]
            _print_json(data)
            return
        _print_model_status(model_id, st)
        if cfg is not None:
            table = Table("setting", "value", "source", title="effective config", title_justify="left")
            for name, s in cfg.values.items():
                table.add_row(name, json.dumps(s.value), s.source)
            console.print(table)


@models_app.command("metadata")
def models_metadata(
    model_id: str = typer.Argument(..., help="a model id (or, with --vmodel, a vmodel id)"),
    vmodel: bool = typer.Option(False, "--vmodel", help="the id is a vmodel's: show its active model's"),
    load: bool = typer.Option(False, "--load", help="load a copy first if none was ever loaded (waits)"),
    timeout: float = typer.Option(120.0, help="seconds --load waits"),
    as_json: bool = typer.Option(False, "--json", help="print KServe V2's metadata JSON"),
) -> None:
    """A model's signature: inputs, outputs it can produce, datatypes, shapes (KServe V2 metadata)."""
    with _client() as c:
        ids = {"vmodel_id": model_id} if vmodel else {"model_id": model_id}
        md = c.get_model_metadata(**ids, load=load, timeout=timeout)
    if as_json:
        _print_json(md.model_dump(mode="json"))
        return
    console.print(Text.assemble((md.name, "bold"), "  ", md.platform,
                                f"  (active: {', '.join(md.versions)})" if md.versions else ""))  # fmt: skip
    table = Table("", "name", "datatype", "shape", title_justify="left")
    for kind, tensors in (("input", md.inputs), ("output", md.outputs)):
        for t in tensors:
            default = kind == "output" and (md.default_outputs is None or t.name in md.default_outputs)
            table.add_row(kind + (" (default)" if default else ""), t.name, t.datatype or "any", str(t.shape))
    console.print(table)


# ---------------------------------------------------------------------- vmodels
def _print_vmodel_status(st: VModelStatus) -> None:
    line = Text.assemble((visible(st.vmodel_id), "bold"), "  ", st.status.value, "  transition ",
                         _styled(st.transition_status))  # fmt: skip
    console.print(line)
    if st.owner:
        console.print(f"  owner   {visible(st.owner)}")

    def copies(cs: list) -> str:
        return ", ".join(f"{visible(c.worker)}{'' if c.state.value == 'LOADED' else ' (loading)'}" for c in cs) or "-"

    # the active and target ids padded to one display width (at least 28 cells, and a space
    # after the longer), so their states line up whatever the ids (wide characters included)
    active, target = visible(st.active_model_id), visible(st.target_model_id)
    width = max(28, cell_len(active) + 1, cell_len(target) + 1 if st.in_transition else 0)
    console.print(Text.assemble("  active  ", ljust_cells(active, width), _styled(st.active_model_serving_state),
                                f"  copies {len(st.active_model_copies)}: {copies(st.active_model_copies)}"))  # fmt: skip
    if st.in_transition:
        console.print(Text.assemble("  target  ", ljust_cells(target, width), _styled(st.target_model_serving_state),
                                    f"  copies {len(st.target_model_copies)}: {copies(st.target_model_copies)}"))  # fmt: skip
    console.print(f"  total copies {st.total_copies}, failed copies {st.failed_copies}")
    failed = st.active_model_failed_copies + st.target_model_failed_copies
    width = max([28] + [cell_len(visible(f.worker)) for f in failed])
    for f in failed:
        console.print(f"  failed  {ljust_cells(visible(f.worker), width)} {_ago(f.time)}: {f.error}",
                      highlight=False, soft_wrap=True)  # fmt: skip
    if st.errors and not (st.active_model_failed_copies or st.target_model_failed_copies):
        console.print(f"  error   {st.errors[0]}", highlight=False, soft_wrap=True)


@vmodels_app.command("list")
def vmodels_list() -> None:
    """Every vmodel: active and target model, transition status, copies."""
    with _client() as c:
        table = Table("vmodel", "active", "state", "target", "transition", "copies", "owner")
        for rec in c.list_vmodels():
            st = c.get_vmodel_status(rec.vmodel_id)
            if st.status.value == "NOT_FOUND":
                continue  # deleted between the two reads
            table.add_row(
                visible(rec.vmodel_id), visible(st.active_model_id), _styled(st.active_model_serving_state),
                visible(st.target_model_id) if st.in_transition else "-", _styled(st.transition_status),
                f"{st.total_copies} ({st.failed_copies} failed)" if st.failed_copies else str(st.total_copies),
                visible(st.owner) if st.owner else "-",
            )  # fmt: skip
        console.print(table)


@vmodels_app.command("set")
def vmodels_set(
    vmodel_id: str = typer.Argument(..., help="the vmodel (alias)"),
    target_model_id: str = typer.Argument(..., help="the concrete model it should serve"),
    uri: Optional[str] = _URI,
    runtime: Optional[str] = _RUNTIME,
    storage_key: Optional[str] = _STORAGE_KEY,
    python_class: Optional[str] = _PYTHON_CLASS,
    max_batch_size: Optional[int] = _MAX_BATCH,
    max_batch_delay_ms: Optional[float] = _MAX_DELAY,
    min_copies: Optional[int] = _MIN_COPIES,
    max_copies: Optional[int] = _MAX_COPIES,
    size_bytes: Optional[int] = _SIZE,
    required_labels: Optional[str] = _LABELS,
    auto_delete: bool = typer.Option(
        False, "--auto-delete", help="delete the target model once no vmodel references it (auto_delete_target_model)"
    ),
    update_only: bool = typer.Option(False, "--update-only", help="fail with NOT_FOUND if the vmodel does not exist"),
    load_now: bool = typer.Option(False, "--load-now", help="load the target now even if the vmodel is new"),
    force: bool = typer.Option(False, "--force", help="switch at once, without waiting for the target's copies"),
    sync: bool = typer.Option(False, "--sync", help="wait until the transition completes (progress shown)"),
    expected_target: Optional[str] = typer.Option(
        None, "--expected-target", help="compare-and-set: only if the current target is this (expected_target_model_id)"
    ),
    owner: Optional[str] = typer.Option(None, "--owner", help="owner namespace of the vmodel"),
    timeout: float = typer.Option(240.0, help="seconds --sync waits"),
) -> None:
    """Create a vmodel or point it at another model (ModelMesh's setVModel).

    With --uri/--runtime the target is registered too. The active model serves until the
    target is loaded on as many copies, then the switch is atomic.
    """
    info = _model_info(uri, runtime, storage_key, python_class, max_batch_size, max_batch_delay_ms,
                       min_copies, max_copies, size_bytes, required_labels)  # fmt: skip
    with _client() as c:
        before = c.get_vmodel_status(vmodel_id, owner)
        need = max(1, len([cp for cp in before.active_model_copies if cp.state.value == "LOADED"]))

        def call() -> VModelStatus:
            return c.set_vmodel(
                vmodel_id, target_model_id, model_info=info, auto_delete_target_model=auto_delete,
                update_only=update_only, load_now=load_now, force=force, sync=sync,
                expected_target_model_id=expected_target, owner=owner, timeout=timeout,
            )  # fmt: skip

        def poll() -> tuple[str, int, int]:
            st = c.get_vmodel_status(vmodel_id, owner)
            if st.in_transition:
                loaded = sum(1 for cp in st.target_model_copies if cp.state.value == "LOADED")
                return (f"{vmodel_id}: {st.active_model_id} -> {st.target_model_id} "
                        f"{st.transition_status} (target {st.target_model_serving_state})", loaded, need)  # fmt: skip
            loaded = sum(1 for cp in st.active_model_copies if cp.state.value == "LOADED")
            done = st.active_model_id == target_model_id and (loaded > 0 or not (load_now or before.active_model_copies))
            return (f"{vmodel_id}: {st.active_model_id} {st.active_model_serving_state}",
                    need if done else loaded, need)  # fmt: skip

        st = _wait_with_progress(call, poll) if sync else call()
        _print_vmodel_status(st)
        if st.status.value == "TRANSITION_FAILED":
            _fail(f"transition of {vmodel_id} to {target_model_id} is blocked by a failed load"
                  f"{': ' + st.errors[0] if st.errors else ''} (the active model keeps serving)")  # fmt: skip


@vmodels_app.command("status")
def vmodels_status(
    vmodel_id: str,
    owner: Optional[str] = typer.Option(None, "--owner"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """A vmodel's active and target model, their states and copies, the transition status."""
    with _client() as c:
        st = c.get_vmodel_status(vmodel_id, owner)
        if st.status.value == "NOT_FOUND":
            _fail(f"vmodel {vmodel_id!r} not found")
        if as_json:
            data = st.model_dump(mode="json")
            data.update(transition_status=st.transition_status, total_copies=st.total_copies,
                        failed_copies_count=st.failed_copies)  # fmt: skip
            _print_json(data)
            return
        _print_vmodel_status(st)


@vmodels_app.command("delete")
def vmodels_delete(vmodel_id: str, owner: Optional[str] = typer.Option(None, "--owner")) -> None:
    """Delete a vmodel (idempotent); models it auto-created go once nothing references them."""
    with _client() as c:
        existed = c.get_vmodel_status(vmodel_id, owner).status.value != "NOT_FOUND"
        deleted = c.vmodels.delete(vmodel_id, owner)
        if not existed:
            console.print(f"{vmodel_id}: not found, nothing to delete")
            return
        console.print(f"{vmodel_id}: deleted" + (f"; auto-deleted {', '.join(deleted)}" if deleted else ""))


# ---------------------------------------------------------------------- repository
@repository_app.command("sync")
def repository_sync(
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="the repository (default: MESH_MODEL_DIR)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Sync the repository once: register new versions, cut vmodels over, unregister removed ones."""
    from mesh.control.registry import MeshRegistry
    from mesh.control.repository import sync_repository

    with _client() as c:
        where = model_dir or c.settings.model_dir
        if not where:
            _fail("no model repository: set MESH_MODEL_DIR or pass --model-dir")
        with err.status(f"syncing {where} ..."):
            registry = MeshRegistry(c.app, c.store, vmodels=c.vmodels, router=c.router)
            report = sync_repository(registry, model_dir=where)
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        _print_sync_report(report)
    if report.skipped:
        _fail("another repository sync is running (the beat's); nothing done, try again")
    if not report.ok:
        _fail(f"repository sync of {report.model_dir} did nothing: {report.error}")
    if report.failures:
        _fail(f"{len(report.failures)} step(s) failed (retried at the next sync)")


def _print_sync_report(report: Any) -> None:
    console.print(Text.assemble((report.model_dir, "bold"), f"  ({report.duration_s * 1000:.0f} ms)"))
    table = Table("", "", show_header=False, box=None, pad_edge=False)
    versions = ", ".join(f"{n} {sorted(v)}" for n, v in sorted(report.versions.items())) or "none"
    table.add_row("published", versions)
    rows: list[tuple[str, list[str] | dict[str, str]]] = [
        ("registered", report.registered), ("manifests", report.manifests_updated),
        ("vmodels set", report.vmodels_set), ("vmodels deleted", report.vmodels_deleted),
        ("unregistered", report.unregistered), ("deferred", report.deferred),
        ("frozen", report.frozen), ("ignored", report.ignored), ("failures", report.failures),
    ]  # fmt: skip
    for label, value in rows:
        if not value:
            continue
        if isinstance(value, dict):
            arrow = " -> " if label == "vmodels set" else ": "
            text = "\n".join(f"{k}{arrow}{v}" for k, v in sorted(value.items()))
        else:
            text = ", ".join(value)
        style = "red" if label in ("frozen", "failures") else ""
        table.add_row(label, Text(text, style=style))
    if report.ok and not any(v for _, v in rows[:6]):
        table.add_row("changes", "none: the registry matches the repository")
    console.print(table)


# ---------------------------------------------------------------------- security
@app.command()
def acl(
    role: str = typer.Argument(..., help="producer (infer and read results only) or operator"),
    user: Optional[str] = typer.Option(None, help="the Redis user's name (default: the role)"),
) -> None:
    """Print the Redis ACL command for a user of this mesh's prefix (Redis >= 7.0;
    docs/security.md). Replace PASSWORD, then run it with redis-cli as an admin."""
    from mesh.protocol.acl import operator_rules, producer_rules, setuser_command
    from mesh.protocol.keys import Keys
    from mesh.settings import get_settings

    rules = {"producer": producer_rules, "operator": operator_rules}.get(role)
    if rules is None:
        _fail(f"unknown role {role!r}: use producer or operator")
        return
    command = setuser_command(user or role, "PASSWORD", rules(Keys(get_settings().prefix)))
    console.print(" ".join(f"'{a}'" if any(c in a for c in "*&%|>~") else a for a in command),
                  soft_wrap=True, highlight=False, markup=False)  # fmt: skip


# ---------------------------------------------------------------------- dead letters
def _dead_letters(c: MeshClient) -> Any:
    from mesh.store.failover import FailoverStore

    return FailoverStore(c.store.r, c.keys)


_TAGS = typer.Argument(None, help="delivery tags (from `list`); none: --all")
_ALL = typer.Option(False, "--all", help="every dead letter")


def _chosen(tags: Optional[list[str]], all_: bool) -> Optional[list[str]]:
    if bool(tags) == all_:
        _fail("name delivery tags or pass --all (not both)")
    return None if all_ else list(tags or [])


@dead_letters_app.command("list")
def dead_letters_list(
    limit: int = typer.Option(100, min=0, help="newest first; 0: all"),
    as_json: bool = typer.Option(False, "--json", help="print them as JSON, the messages included"),
) -> None:
    """The dead letters, newest first: model (or queue), delivery tag, task, task id,
    deliveries, when, why. A model queue shows its model id as people wrote it (the queue's
    name holds it encoded); --json has both, `model` and the raw `queue`."""
    with _client() as c:
        entries = _dead_letters(c).dead_letters(limit)
        if as_json:
            _print_json([{**e.model_dump(exclude={"raw"}), "message": json.loads(e.raw).get("message")}
                         for e in entries])  # fmt: skip
            return
        table = Table("model / queue", "delivery tag", "task", "task id", "deliveries", "dead-lettered", "reason")
        for e in entries:
            # another queue (a worker's, the control queue, a made-up name) by its full name
            where = visible(e.model) if e.model is not None else Text(visible(e.queue), style="dim")
            table.add_row(where, visible(e.tag), visible(e.task or "-"), visible(e.task_id or "-"),
                          str(e.deliveries), _ago(e.time), visible(e.reason))  # fmt: skip
        console.print(table)


@dead_letters_app.command("requeue")
def dead_letters_requeue(tags: Optional[list[str]] = _TAGS, all_: bool = _ALL) -> None:
    """Put dead letters back on their queue, with a fresh delivery count."""
    with _client() as c:
        n = _dead_letters(c).requeue(_chosen(tags, all_))
    console.print(f"requeued {n} dead letter(s)")


@dead_letters_app.command("purge")
def dead_letters_purge(tags: Optional[list[str]] = _TAGS, all_: bool = _ALL) -> None:
    """Delete dead letters for good (their producers were answered when they were dead-lettered)."""
    with _client() as c:
        n = _dead_letters(c).purge(_chosen(tags, all_))
    console.print(f"purged {n} dead letter(s)")


# ---------------------------------------------------------------------- watching
@app.command()
def workers() -> None:
    """Live workers: capacity, used bytes, loaded models, request rate."""
    with _client() as c:
        table = Table("worker", "used / capacity", "models", "req/s", "requests", "mean batch", "state")
        for w in c.list_workers():
            table.add_row(
                visible(w.name), f"{w.used_bytes / 2**20:.1f} / {w.capacity_bytes / 2**20:.0f} MiB",
                ", ".join(visible(m.model_id) for m in w.models) or "-", f"{w.request_rate:.1f}",
                str(w.requests_total), f"{w.mean_batch_size:.1f}",
                "shutting down" if w.shutting_down else "up",
            )  # fmt: skip
        console.print(table)


def _status_renderable(client: MeshClient, limit: int) -> Any:
    from mesh.tools.dashboard import render_status

    workers = client.list_workers()
    now = time.strftime("%H:%M:%S")
    rate = sum(w.request_rate for w in workers)
    header = Text.assemble(
        ("prefix ", "dim"), (client.settings.prefix, "bold"), ("  redis ", "dim"), safe_url(client.redis_url),
        f"  {now}  {len(workers)} workers, {rate:.1f} req/s",
    )  # fmt: skip
    return Group(header, render_status(client, limit=limit))


@app.command()
def status(
    watch: bool = typer.Option(False, "--watch", "-w", help="refresh until Ctrl-C"),
    interval: float = typer.Option(2.0, "--interval", "-n", min=0.2, help="seconds between refreshes with --watch"),
    limit: int = typer.Option(50, help="models shown (busiest first)"),
    as_json: bool = typer.Option(False, "--json", help="the mesh's signals as JSON (what `mesh exporter` serves)"),
) -> None:
    """The pool at a glance: workers with capacity bars, models with copies and state, queue
    depths, request rates, vmodel transitions in progress, the last rebalance. With --json:
    the autoscaling signals (top --limit models by pending, per worker pool, and aggregates) and the
    workers."""
    from redis import RedisError

    with _client() as c:
        if as_json:
            from mesh.tools.exporter import SignalSource

            signals, took = SignalSource(_store_context(c), top_n=limit, min_interval_s=0,
                                         top_pools=c.settings.signals_top_pools).read()  # fmt: skip
            workers = [
                {"name": w.name, "capacity_bytes": w.capacity_bytes, "used_bytes": w.used_bytes,
                 "models": [m.model_id for m in w.models], "loading": w.loading,
                 "shutting_down": w.shutting_down, "request_rate": w.request_rate, "labels": w.labels}
                for w in c.list_workers()
            ]  # fmt: skip
            _print_json({"prefix": c.settings.prefix, "read_seconds": round(took, 4),
                         "signals": signals.model_dump(), "workers": workers})  # fmt: skip
            return
        if not watch:
            console.print(_status_renderable(c, limit))
            return
        from rich.live import Live

        def frame() -> Any:
            try:
                return _status_renderable(c, limit)
            except RedisError as exc:  # keep watching through a Redis restart
                return Text(f"{time.strftime('%H:%M:%S')}  cannot reach Redis: {exc}; retrying", style="red")

        try:
            with Live(frame(), console=console, auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(frame(), refresh=True)
        except KeyboardInterrupt:
            return


# ---------------------------------------------------------------------- inference
def _read_inputs(inputs: str) -> Any:
    import numpy as np

    if inputs == "-":
        text, name = sys.stdin.read(), "standard input"
    else:
        path = Path(inputs)
        if not path.is_file():
            _fail(f"no such file: {inputs}")
        name = str(path)
        if path.suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                _fail(f"{path} is not a .npy array: {exc}")
        text = path.read_text()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{name} is not JSON: {exc}")
    return payload


def _body_outputs(payload: Any) -> Any:
    """A whole V2 request body's `outputs`, if it names any."""
    return payload.get("outputs") if isinstance(payload, dict) and "inputs" in payload else None


@app.command()
def infer(
    target: str = typer.Argument(..., help="model id (or vmodel id with --vmodel)"),
    inputs: str = typer.Argument(..., help="a .json file of V2 input tensors (or a V2 request body), a .npy array, or - for JSON on stdin"),
    vmodel: bool = typer.Option(False, "--vmodel", help="TARGET is a vmodel id"),
    priority: Optional[str] = typer.Option(None, help="high | normal (default: the model's)"),
    timeout_ms: Optional[float] = typer.Option(None, "--timeout-ms", help="revoke the request if it has not started by then"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the answer"),
    pretty: bool = typer.Option(False, "--pretty", help="indent the JSON"),
    output: Optional[list[str]] = typer.Option(
        None, "--output", help="an output to return (repeatable; default: the model's default outputs, or a V2 body's)"
    ),
) -> None:
    """Send one inference request and print the V2 response (one line of JSON)."""
    payload = _read_inputs(inputs)
    outputs = output or _body_outputs(payload)
    if isinstance(payload, dict) and "inputs" in payload:
        payload = payload["inputs"]  # a whole V2 request body
    with _client() as c:
        kw = {"vmodel_id": target} if vmodel else {"model_id": target}
        response = c.infer(inputs=payload, priority=priority, timeout_ms=timeout_ms, outputs=outputs or None,
                           **kw).get(timeout=timeout)  # fmt: skip
    if pretty:
        _print_json(response)
    else:
        sys.stdout.write(json.dumps(response) + "\n")


# ---------------------------------------------------------------------- entry point
def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class `name`, from typer's vendored click and from click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mesh` console script: exit status 0, 1 (error) or 2 (usage)."""
    import logging

    from celery.exceptions import CeleryError, TaskRevokedError
    from celery.exceptions import TimeoutError as ResultTimeout
    from pydantic import ValidationError
    from redis import ConnectionError as RedisConnectionError
    from redis import RedisError
    from redis import TimeoutError as RedisTimeoutError

    if os.environ.get("MESH_DEBUG"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    else:
        # the library's warnings repeat what the command prints as its outcome
        logging.getLogger().addHandler(logging.NullHandler())

    def fail(message: str, code: int = 1) -> None:
        _print_error(message)
        sys.exit(code)

    usage_error = _click_exceptions("UsageError")
    click_error = _click_exceptions("ClickException")
    abort = _click_exceptions("Abort")
    try:
        code = app(args=argv, prog_name="mesh", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # the help was printed: that is the message
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        fail(f"{_one_line(exc.format_message())}{hint}", 2)  # type: ignore[attr-defined]
    except (*abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except click_error as exc:
        fail(_one_line(exc.format_message()), getattr(exc, "exit_code", 1))  # type: ignore[attr-defined]
    except UserError as exc:
        fail(_one_line(exc))
    except MeshError as exc:
        fail(f"{exc.code}: {_one_line(exc)}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        fail(f"invalid {where}: {first.get('msg')}")
    except ResultTimeout as exc:
        fail(f"no answer in time ({_one_line(exc)}); the request may still be answered later")
    except TaskRevokedError as exc:
        fail(f"the request was revoked before it started (its timeout passed): {_one_line(exc)}")
    except (RedisConnectionError, RedisTimeoutError) as exc:
        fail(f"cannot reach Redis: {_one_line(exc)} (set MESH_REDIS_URL, or start one with `mesh up`)")
    except RedisError as exc:
        fail(f"Redis: {_one_line(exc)}")
    except OSError as exc:
        fail(_one_line(exc))
    except CeleryError as exc:
        fail(f"{type(exc).__name__}: {_one_line(exc)}")
    except Exception as exc:
        if os.environ.get("MESH_DEBUG"):
            raise
        fail(f"unexpected {type(exc).__name__}: {_one_line(exc)} (MESH_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
    main()
