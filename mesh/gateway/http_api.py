"""The HTTP port: KServe V2 REST (kserve/kserve docs/predict-api/v2/required_api.md), with
Triton's binary tensor extension (what tritonclient.http sends by default), on aiohttp.

Routing headers are ModelMesh's (`mm-model-id`, `mm-vmodel-id`, and `-bin` forms holding
base64 of a UTF-8 id: HTTP headers cannot carry raw UTF-8). Errors answer `{"error": msg}`
with the HTTP status of the gRPC code (mesh/gateway/errors.py).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mesh.errors import InvalidInput
from mesh.gateway import codec
from mesh.gateway.errors import http_status, status_of
from mesh.gateway.frontend import EXTENSIONS, SERVER_NAME, Frontend
from mesh.gateway.targets import Target, pick

log = logging.getLogger("mesh.gateway.http")

HEADER_LENGTH = "Inference-Header-Content-Length"


def _error(exc: BaseException, what: str) -> web.Response:
    code, message = status_of(exc)
    status = http_status(code)
    if status >= 500 and status != 503 and status != 504:
        log.warning("%s failed: %s", what, message)
    return web.json_response({"error": message}, status=status)


def _target(request: web.Request) -> Target:
    return pick(request.match_info.get("name", ""), request.match_info.get("version", ""), request.headers.items())


def build_app(frontend: Frontend, max_body_bytes: int) -> web.Application:
    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        ok = await frontend.server_ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": frontend.version, "extensions": EXTENSIONS})

    async def model_metadata(request: web.Request) -> web.Response:
        try:
            meta = await frontend.model_metadata(_target(request))
        except Exception as exc:
            return _error(exc, "model metadata")
        return web.json_response({"name": meta.name, "versions": meta.versions, "platform": meta.platform,
                                  "inputs": meta.inputs, "outputs": meta.outputs})  # fmt: skip

    async def model_ready(request: web.Request) -> web.Response:
        try:
            ok = await frontend.model_ready(_target(request))
        except Exception as exc:
            return _error(exc, "model ready")
        return web.json_response({"name": request.match_info["name"], "ready": ok}, status=200 if ok else 503)

    async def infer(request: web.Request) -> web.Response:
        try:
            target = _target(request)
            raw_length = request.headers.get(HEADER_LENGTH)
            try:
                header_length = int(raw_length) if raw_length is not None else None
            except ValueError:
                raise InvalidInput(f"{HEADER_LENGTH} must be an integer") from None
            body = await request.read()
            parsed, tensors = codec.rest_request(body, header_length)
            asked = [o.get("name") for o in parsed.get("outputs") or [] if isinstance(o, dict)]
            if not all(isinstance(n, str) for n in asked):
                raise InvalidInput("each requested output needs a string name")
            # Triton's `timeout` parameter (microseconds); none: the gateway's default deadline
            deadline_s = codec.rest_timeout(parsed)
            result = await frontend.infer(target, tensors, deadline_s, asked or None)
            outputs = codec.requested(asked, result.get("outputs") or [])
            payload, length = codec.rest_response(result, parsed, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _error(exc, "infer")
        if length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    @web.middleware
    async def same_site_only(request: web.Request, handler):  # type: ignore[no-untyped-def]
        # a web page open in a local browser could POST to a loopback port (a "simple" request
        # needs no CORS preflight); browsers mark such requests, other clients send no such header
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            return web.json_response({"error": "cross-site requests are refused"}, status=403)
        return await handler(request)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[same_site_only])
    app.add_routes([
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", server_metadata),
        web.get("/v2/models/{name}", model_metadata),
        web.get("/v2/models/{name}/versions/{version}", model_metadata),
        web.get("/v2/models/{name}/ready", model_ready),
        web.get("/v2/models/{name}/versions/{version}/ready", model_ready),
        web.post("/v2/models/{name}/infer", infer),
        web.post("/v2/models/{name}/versions/{version}/infer", infer),
    ])  # fmt: skip
    return app

