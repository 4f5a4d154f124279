"""A real `mesh gateway` process for tests, and ModelMesh's management stubs generated from
its proto (as a ModelMesh user would generate them), independent of the gateway's code."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mesh.tools.launcher import Proc, start_gateway, wait_gateway_ready

PROTO_DIR = Path(__file__).resolve().parents[2] / "mesh" / "gateway" / "protos"


@dataclass
class Gateway:
    proc: Proc
    grpc_port: int
    http_port: int

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"


def start(env: dict[str, str], log_dir: Path, **extra: str) -> Gateway:
    env = {**env, "MESH_GATEWAY_GRPC_PORT": "0", "MESH_GATEWAY_HTTP_PORT": "0", **extra}
    proc = start_gateway(env, log_dir)
    try:
        ports = wait_gateway_ready(proc, timeout=60)
    except BaseException:
        proc.stop()
        raise
    return Gateway(proc, ports["grpc"], ports["http"])


@contextmanager
def in_process(client: Any, **settings: Any) -> Iterator[Gateway]:
    """`mesh gateway`'s `serve` on an event loop of its own (a thread of this process) over
    `client`, whose reply listener the test can then inspect. `settings`: MeshSettings fields
    over the client's (ports: any free one)."""
    from mesh.gateway.server import serve

    fields = {"gateway_grpc_port": 0, "gateway_http_port": 0, **settings}
    conf = client.settings.model_copy(update=fields)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["stop"] = asyncio.Event()

        def on_ready(b: Any) -> None:
            state["bound"] = b
            ready.set()

        try:
            await serve(conf, client, on_ready=on_ready, stop=state["stop"])
        except BaseException as exc:
            state["error"] = exc
            ready.set()
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="test-gateway", daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the in-process gateway did not start"
        if "error" in state:
            raise state["error"]
        yield Gateway(None, state["bound"].grpc_port, state["bound"].http_port)  # type: ignore[arg-type]
    finally:
        if "stop" in state:
            loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the in-process gateway did not stop"
        loop.close()


def modelmesh_stubs(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """(model_mesh_pb2, model_mesh_pb2_grpc) compiled by grpcio-tools from model-mesh.proto."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc in a process of its own: in the test process, where TensorFlow (and the protobuf
    # library it links) may already be loaded by the runtime tests, grpc_tools' compiler
    # crashed the whole run with a segmentation fault (a clean-clone CI run)
    done = subprocess.run([
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", str(PROTO_DIR / "model-mesh.proto"),
    ], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, f"protoc failed on model-mesh.proto: {done.stderr}"
    sys.path.insert(0, str(out_dir))
    try:
        pb2 = importlib.import_module("model_mesh_pb2")
        grpc_mod = importlib.import_module("model_mesh_pb2_grpc")
    finally:
        sys.path.remove(str(out_dir))
    return pb2, grpc_mod


def metadata(**ids: str) -> list[tuple[str, Any]]:
    """gRPC metadata of routing ids: ASCII ids as text, others in the `-bin` form (bytes)."""
    out: list[tuple[str, Any]] = []
    for key, value in ids.items():
        name = key.replace("_", "-")
        if value.isascii():
            out.append((name, value))
        else:
            out.append((name + "-bin", value.encode("utf-8")))
    return out
