"""`mesh gateway`: both ports on one event loop, one MeshClient, until SIGTERM/SIGINT.

The process is a producer (docs/security.md): it holds the mesh's Redis credentials and
serves the management API without a login of its own, so it binds MESH_GATEWAY_HOST
(127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from mesh.client import MeshClient
from mesh.gateway.frontend import Frontend
from mesh.gateway.grpc_api import build_server
from mesh.gateway.http_api import build_app
from mesh.gateway.management import Management
from mesh.settings import MeshSettings

log = logging.getLogger("mesh.gateway")

READY_LINE = "mesh gateway listening:"  # tests and `mesh up` read the bound ports from this line


@dataclass
class Bound:
    grpc_port: int
    http_port: int | None


async def serve(
    settings: MeshSettings,
    client: MeshClient,
    *,
    on_ready: Callable[[Bound], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    frontend = Frontend(client, settings.gateway_request_timeout_s)
    management = Management(client) if settings.gateway_management else None
    host = settings.gateway_host
    server = build_server(frontend, management, settings.gateway_max_message_bytes,
                          reflection=settings.gateway_reflection)  # fmt: skip
    where = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address
    grpc_port = server.add_insecure_port(f"{where}:{settings.gateway_grpc_port}")
    if grpc_port == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{settings.gateway_grpc_port}")
    await server.start()
    runner = None
    http_port = None
    try:
        if settings.gateway_http_port >= 0:
            # handler_cancellation: a client that disconnects cancels its request's handler
            # (off by default since aiohttp 3.8; the option is 3.9's), so the wait for its answer ends and
            # the request's handle leaves the reply listener (MeshClient.infer_async)
            runner = web.AppRunner(build_app(frontend, settings.gateway_max_message_bytes), access_log=None,
                                   handler_cancellation=True)  # fmt: skip
            await runner.setup()
            site = web.TCPSite(runner, host, settings.gateway_http_port)
            await site.start()
            http_port = runner.addresses[0][1]
        bound = Bound(grpc_port, http_port)
        if on_ready is not None:
            on_ready(bound)
        stop = stop or asyncio.Event()
        await stop.wait()
    finally:
        await server.stop(grace=5)
        if runner is not None:
            await runner.cleanup()


def run(settings: MeshSettings, announce: Callable[[str], None] = print) -> None:
    """Run the gateway in this process until SIGINT/SIGTERM."""
    client = MeshClient(settings=settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(b: Bound) -> None:
            host = settings.gateway_host
            http = f" http={host}:{b.http_port}" if b.http_port else ""
            announce(f"{READY_LINE} grpc={host}:{b.grpc_port}{http}")

        await serve(settings, client, on_ready=ready, stop=stop)

    try:
        asyncio.run(main())
    finally:
        client.close()
