"""MeshClient: the producer and management API (ModelMesh's calls, in Python)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from uuid import uuid4

from celery import Celery
from pydantic import ValidationError

import mesh.errors
from mesh.broker.publisher import InferPublisher, Outbox, Prepared
from mesh.broker.redis_url import DEFAULT_LOCAL_URL, resolve_redis_url, with_tls_options
from mesh.broker.replies import MeshResult, ReplyListener
from mesh.control.commands import send_command, unload_unregistered
from mesh.control.routing import Router
from mesh.control.vmodels import SYNC_TIMEOUT_S, VModelManager
from mesh.errors import DeadlineExceeded, InvalidArgument, ModelNotFound, PermissionDenied, RequestTooLarge
from mesh.models import (
    PLATFORMS,
    Command,
    ModelInfo,
    ModelMetadata,
    ModelRecord,
    ModelState,
    ModelStatus,
    VModelRecord,
    VModelStatus,
    WorkerState,
)
from mesh.policy.precedence import EffectiveConfig, copies_config, effective_config, labels_config, record_manifest
from mesh.protocol import jsonwire
from mesh.protocol.ids import validate_id
from mesh.protocol.messages import (
    INFER_TASK,
    MODEL_HEADER,
    PRIORITIES,
    RUNTIME_NAMES,
    SENT_AT_HEADER,
    VMODEL_HEADER,
)
from mesh.protocol.tensors import decode_stacked, encode_inputs, encode_output_names, raw_items
from mesh.settings import MeshSettings, get_settings
from mesh.storage.sources import validate_uri
from mesh.store.context import StoreContext, is_permission_error, redis_client
from mesh.store.state import Route

log = logging.getLogger("mesh.client")

MAX_TIMEOUT_MS = 365 * 24 * 3600 * 1000.0  # a request deadline beyond a year is a mistake


F = TypeVar("F", bound=Callable[..., Any])


def _management(fn: F) -> F:
    """A management call made with a Redis user that may not manage (a producer's, docs/
    security.md "Redis ACLs") raises PermissionDenied saying so, not redis-py's NoPermissionError."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, mesh.errors.MeshError) or not is_permission_error(exc):
                raise
            raise PermissionDenied(
                f"PERMISSION_DENIED: {fn.__name__}: this mesh's Redis user may not manage models ({exc})"
            ) from None

    return call  # type: ignore[return-value]


class MeshClient:
    """Register models, send inference requests, read status.

    `MeshClient()` uses MESH_* settings; `MeshClient(redis_url=..., prefix=...)` addresses
    another mesh (its own Celery app, so producers of two meshes never mix).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str | None = None,
        *,
        settings: MeshSettings | None = None,
    ) -> None:
        if settings is None:
            overrides = {k: v for k, v in {"redis_url": redis_url, "prefix": prefix}.items() if v}
            settings = MeshSettings(**overrides) if overrides else get_settings()
        self.settings = settings
        url = resolve_redis_url(settings.redis_url) or DEFAULT_LOCAL_URL
        url = with_tls_options(url, settings.redis_ca_certs, settings.redis_certfile, settings.redis_keyfile)
        self.redis_url = url
        ctx = StoreContext.from_settings(settings, url)
        self.keys = ctx.keys
        self._redis = ctx.redis
        self.store = ctx.store
        if settings is get_settings():
            from mesh.app import app as default_app

            self.app: Celery = default_app
        else:
            from mesh.app import create_app

            self.app = create_app(settings, url)
        self.router = Router(self.app, self.store)
        self._publisher = InferPublisher(self._redis, self.keys)
        self._outbox = Outbox(self._publisher.push_sends)
        self._replies: ReplyListener | None = None
        self._replies_lock = threading.Lock()
        self._routes: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): `_prepare_off_loop`
        self._routes_lock = threading.Lock()

    def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()
        routes, self._routes = self._routes, None
        if routes is not None and routes[0] == os.getpid():
            routes[1].shutdown(wait=False)
        self._redis.close()
        if self.app is not _default_app():
            self.app.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ models
    @_management
    def register_model(
        self,
        model_id: str,
        info: ModelInfo,
        *,
        load_now: bool = False,
        sync: bool = False,
        timeout: float = 60.0,
        required_labels: dict[str, str] | None = None,
    ) -> ModelStatus:
        """Register a concrete model (idempotent with identical info; ALREADY_EXISTS otherwise).

        `required_labels`: only workers carrying these labels (MESH_WORKER_LABELS) may hold it;
        the same as `ModelInfo.required_labels` (giving both, they must agree)."""
        validate_id(model_id)
        if not isinstance(info, ModelInfo):
            try:
                info = ModelInfo.model_validate(info)
            except ValidationError as exc:  # INVALID_ARGUMENT, like every management error
                raise InvalidArgument(f"invalid model info for {model_id!r}: {exc}") from None
        if required_labels is not None:
            if info.required_labels is not None and info.required_labels != required_labels:
                raise InvalidArgument(
                    f"required_labels {required_labels} differ from the model info's {info.required_labels}"
                )
            try:
                info = ModelInfo.model_validate({**info.model_dump(), "required_labels": required_labels})
            except ValidationError as exc:
                raise InvalidArgument(f"invalid required_labels for {model_id!r}: {exc}") from None
        validate_uri(info.uri, info.storage_key)
        _check_runtime(info.runtime)
        self.store.register_model(model_id, info)
        if load_now:
            return self.ensure_loaded(model_id, sync=sync, timeout=timeout)
        return self.get_model_status(model_id)

    @_management
    def unregister_model(self, model_id: str) -> None:
        """Remove a model and unload every copy; requests still queued fail with NOT_FOUND.

        Idempotent. FAILED_PRECONDITION while a vmodel references the model.
        """
        validate_id(model_id)
        record, holders = self.store.unregister(model_id)
        self.router.forget(model_id)
        unload_unregistered(self.app, self.store, model_id, holders,
                            generation=record.created_at if record else None)  # fmt: skip

    def get_model_status(self, model_id: str) -> ModelStatus:
        return self.store.model_status(model_id)

    @_management
    def ensure_loaded(self, model_id: str, *, sync: bool = False, timeout: float = 60.0) -> ModelStatus:
        """Load a copy if there is none (never a second one); with sync, wait until it is done.

        Returns the status; with sync it is LOADED or LOADING_FAILED, or DEADLINE_EXCEEDED is
        raised after `timeout` seconds.
        """
        validate_id(model_id)
        if self.store.get_record(model_id) is None:
            raise ModelNotFound(f"model {model_id!r} not found")
        route = self.store.route(model_id, claimant=self.router.name)
        if route is Route.CLAIMED:
            placement = self.store.place_load(model_id)
            if placement.worker is not None:
                send_command(self.store, placement.worker, Command(op="load", model_id=model_id))
        status = self.get_model_status(model_id)
        if not sync:
            return status
        return self._wait_status(
            model_id,
            # a reason (no worker of its pool is up) ends the wait too: nothing is loading it
            lambda s: s.state in (ModelState.LOADED, ModelState.LOADING_FAILED, ModelState.NOT_FOUND) or bool(s.reason),
            timeout,
        )

    def _wait_status(self, model_id: str, done: Callable[[ModelStatus], bool], timeout: float) -> ModelStatus:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.get_model_status(model_id)
            if done(status):
                return status
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"model {model_id!r} still {status.state.value} after {timeout:g}s"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    def get_model_metadata(
        self,
        model_id: str | None = None,
        *,
        vmodel_id: str | None = None,
        load: bool = False,
        timeout: float = 60.0,
    ) -> ModelMetadata:
        """A model's signature in KServe V2's metadata shape: its inputs (names, datatypes,
        shapes), the outputs a request may name, its platform (mesh/models.py ModelMetadata).

        The signature is measured when a worker first loads the model: before that this raises
        FailedPrecondition, unless `load` asks for a copy (ensure_loaded) and waits for it up to
        `timeout` seconds. For a vmodel, the metadata of its active model, with that model's id
        in `versions`. Unknown ids raise ModelNotFound.
        """
        if (model_id is None) == (vmodel_id is None):
            raise InvalidArgument("get_model_metadata needs a model_id or a vmodel_id (one of them)")
        name = model_id if model_id is not None else vmodel_id
        concrete = model_id
        if vmodel_id is not None:
            vm = self.vmodels.status(vmodel_id)
            if not vm.active_model_id:
                raise ModelNotFound(f"vmodel {vmodel_id!r} not found")
            concrete = vm.active_model_id
        record = self.store.get_record(validate_id(concrete))
        if record is None:
            raise ModelNotFound(f"model {concrete!r} not found")
        signature = self.store.get_signature(concrete, record.created_at)
        if signature is None and load:
            status = self.ensure_loaded(concrete, sync=True, timeout=timeout)
            if status.state is ModelState.LOADING_FAILED:
                raise mesh.errors.ModelLoadFailed(
                    f"model {concrete!r} failed to load: {status.errors[0] if status.errors else 'no reason given'}"
                )
            # the signature is written just before the copy is marked LOADED
            signature = self.store.get_signature(concrete, record.created_at)
        if signature is None:
            raise mesh.errors.FailedPrecondition(
                f"model {concrete!r} has not been loaded yet: its signature is known once a worker loads it "
                "(ensure_loaded, or get_model_metadata(..., load=True))"
            )
        return ModelMetadata(
            name=name,
            versions=[concrete] if vmodel_id is not None else [],
            platform=PLATFORMS.get(signature.runtime, signature.runtime),
            inputs=signature.inputs,
            outputs=signature.outputs,
            default_outputs=signature.default_outputs,
        )

    def list_models(self) -> list[ModelRecord]:
        return self.store.list_records()

    def list_workers(self) -> list[WorkerState]:
        return self.store.live_workers()

    def get_effective_config(self, model_id: str) -> EffectiveConfig:
        record = self.store.get_record(validate_id(model_id))
        if record is None:
            raise ModelNotFound(f"model {model_id!r} not found")
        cfg = effective_config(model_id, record.info, self.settings, manifest=record_manifest(record))
        cfg.values.update(copies_config(record, self.settings))
        cfg.values.update(labels_config(record))
        return cfg

    # ------------------------------------------------------------------ inference
    def infer(
        self,
        model_id: str | None = None,
        *,
        vmodel_id: str | None = None,
        inputs: Any,
        priority: str | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[Any] | None = None,
    ) -> MeshResult:
        """Enqueue one request; returns its handle, a Celery AsyncResult (`.get()` gives the V2
        response) that can also be awaited.

        `inputs`: KServe V2 tensors (dicts or InferTensor), a numpy array, a list of arrays or
        a dict name -> array, or a pandas DataFrame (one tensor per column, for models trained
        on a DataFrame: docs/runtimes.md). `outputs`: the output names wanted (KServe V2
        `outputs`, e.g. ["predict", "predict_proba"]; default: the model's default, "predict"
        for tabular models); a name the model lacks fails the request with InvalidInput.
        Unknown ids raise ModelNotFound here, before anything is sent;
        a full queue raises QueueFull. `priority` is "high" or "normal" (default: the model's
        `default_priority`); `timeout_ms` (default: the model's `default_timeout_ms`) bounds
        the time until the request starts: after it the request is never run and `get()`
        raises TaskRevokedError.

        The message is Celery's (any Celery consumer reads it) and goes out in one Redis round
        trip on the calling thread; the result comes back through this client's reply list
        (mesh/broker/replies.py) and is also stored for `AsyncResult(id)` in other processes.
        """
        tensors = encode_inputs(inputs, self.settings.raw_tensors)
        return self._send(model_id, vmodel_id, _with_outputs({"inputs": tensors}, outputs), priority, timeout_ms)

    def infer_many(
        self,
        model_id: str | None = None,
        *,
        vmodel_id: str | None = None,
        inputs: Sequence[Any],
        priority: str | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[Any] | None = None,
    ) -> MeshResult:
        """Send many requests in ONE message (client-side micro-batching).

        Each element of `inputs` is one request's inputs, in any form `infer` accepts. The
        broker costs about a millisecond per message whatever its size, so this is the way
        past one worker process's message rate. `get()` returns
        `{"model_name", "id", "results": [...]}` with one entry per element, in order: either
        `{"outputs": [...]}` or `{"error": {"code", "type", "message"}}` — items fail
        individually (a malformed item does not fail its neighbours). `raise_for_item`
        turns an error entry into the typed exception. `outputs` (as for `infer`) applies to
        every item.
        """
        items = _many_items(inputs, self.settings.raw_tensors)
        return self._send(model_id, vmodel_id, _with_outputs({"items": items}, outputs), priority, timeout_ms)

    async def infer_async(
        self,
        model_id: str | None = None,
        *,
        vmodel_id: str | None = None,
        inputs: Any,
        priority: str | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[Any] | None = None,
        max_timeout_ms: float | None = None,
    ) -> dict:
        """`infer(...)` awaited: the V2 response, or the request's error raised.

        The requests a loop sends in one turn go out together at the end of the turn, in one
        Redis round trip on the loop's thread; a route that must read Redis first (a model not
        remembered as served) runs on this client's route thread, leaving the loop free. The
        wait costs no thread, so one loop can keep thousands of requests in flight. Cancelling
        the await does not cancel the request (bound it with `timeout_ms`); `asyncio.timeout`
        bounds the wait. A cancelled await leaves nothing behind in this client (its handle
        leaves the reply listener); a reply that still comes is dropped. A request cancelled
        while its route runs is not sent, and a load its route placed is sent all the same.
        `max_timeout_ms`, when `timeout_ms` is not given: the longest expiry the model's
        `default_timeout_ms` may give the request (what a caller that will wait no longer than
        that passes, e.g. the gateway's default deadline).
        """
        tensors = encode_inputs(inputs, self.settings.raw_tensors)
        return await self._send_async(model_id, vmodel_id, _with_outputs({"inputs": tensors}, outputs), priority,
                                      timeout_ms, max_timeout_ms)  # fmt: skip

    async def infer_many_async(
        self,
        model_id: str | None = None,
        *,
        vmodel_id: str | None = None,
        inputs: Sequence[Any],
        priority: str | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[Any] | None = None,
    ) -> dict:
        """`infer_many(...)` awaited (see `infer_async`)."""
        items = _many_items(inputs, self.settings.raw_tensors)
        return await self._send_async(model_id, vmodel_id, _with_outputs({"items": items}, outputs), priority,
                                      timeout_ms)  # fmt: skip

    def _check_size(self, size: int) -> None:
        if size > self.settings.max_request_bytes:
            raise RequestTooLarge(
                f"request of {size} bytes exceeds MESH_MAX_REQUEST_BYTES="
                f"{self.settings.max_request_bytes}; nothing was enqueued"
            )

    def _send(
        self,
        model_id: str | None,
        vmodel_id: str | None,
        kwargs: dict,
        priority: str | None,
        timeout_ms: float | None,
    ) -> MeshResult:
        handle, messages, concrete = self._prepare(model_id, vmodel_id, kwargs, priority, timeout_ms)
        try:
            try:
                self._publisher.push(messages)
            except Exception as exc:
                alone = self._request_alone(messages, concrete, exc)
                if alone is None:
                    raise
                self._publisher.push(alone)
        except BaseException:
            self._reply_listener().discard(handle.id)
            raise
        return handle

    async def _send_async(
        self,
        model_id: str | None,
        vmodel_id: str | None,
        kwargs: dict,
        priority: str | None,
        timeout_ms: float | None,
        max_timeout_ms: float | None = None,
    ) -> dict:
        args = (model_id, vmodel_id, kwargs, priority, timeout_ms, max_timeout_ms)
        if self.router.remembers(model_id, vmodel_id):
            handle, messages, concrete = self._prepare(*args)
        else:
            handle, messages, concrete = await self._prepare_off_loop(args)
        try:
            try:
                await self._outbox.send(*messages)
            except Exception as exc:
                alone = self._request_alone(messages, concrete, exc)
                if alone is None:
                    raise
                await self._outbox.send(*alone)
            return await handle
        except BaseException:
            # the handle never leaves this call: once its await ends without a reply (cancelled,
            # a timeout), nobody can ask for the reply, and the listener must not keep it
            self._reply_listener().discard(handle.id)
            raise

    async def _prepare_off_loop(self, args: tuple) -> tuple[MeshResult, list[Prepared], str]:
        """`_prepare` on a thread: its route reads Redis (one to three round trips, a cold one
        places a load, longer while Redis is slow), and on the loop's thread that stalled every
        other request of the loop meanwhile. Cancelled meanwhile, the route still finishes: a
        load it placed is sent without the request (as when the request itself fails after
        placing it) and its handle is forgotten. One thread takes the routes in turn, as the
        loop did: a burst of cold requests costs no thread each."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._route_pool(), self._prepare, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._abandon_prepared)
            raise

    def _route_pool(self) -> ThreadPoolExecutor:
        routes = self._routes
        if routes is not None and routes[0] == os.getpid():
            return routes[1]
        with self._routes_lock:
            if self._routes is None or self._routes[0] != os.getpid():  # a forked child gets its own
                self._routes = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-route"))
            return self._routes[1]

    def _abandon_prepared(self, future: asyncio.Future) -> None:
        """Loop thread: the route of a request whose await was cancelled has finished."""
        if future.cancelled() or future.exception() is not None:
            return
        handle, messages, _ = future.result()
        self._reply_listener().discard(handle.id)
        if len(messages) > 1:  # the load command(s) ahead of the request
            self._outbox.send(*messages[:-1]).add_done_callback(_log_failed_load_push)

    def _prepare(
        self,
        model_id: str | None,
        vmodel_id: str | None,
        kwargs: dict,
        priority: str | None,
        timeout_ms: float | None,
        max_timeout_ms: float | None = None,
    ) -> tuple[MeshResult, list[Prepared], str]:
        """Route, then build the messages to push (the model's load command first, when this
        request starts its load: one round trip for both) and the handle, watched by the reply
        listener before the message exists: its reply can come before the push returns. Also
        the concrete model id."""
        if priority is not None and (not isinstance(priority, str) or priority not in PRIORITIES):
            raise InvalidArgument(f"priority must be one of {sorted(PRIORITIES)}, not {priority!r}")
        for name, value in (("timeout_ms", timeout_ms), ("max_timeout_ms", max_timeout_ms)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0 < value <= MAX_TIMEOUT_MS  # also refuses NaN
            ):  # fmt: skip
                raise InvalidArgument(f"{name} must be a number in (0, {MAX_TIMEOUT_MS:g}], not {value!r}")
        loads: list[Prepared] = []
        concrete, cfg = self.router.route(model_id, vmodel_id, loads)
        try:
            handle, prepared = self._build(concrete, cfg, vmodel_id, kwargs, priority, timeout_ms, max_timeout_ms)
        except BaseException:
            if loads:  # the load was placed: it goes ahead without this request, as it always did
                try:
                    self._publisher.push(loads)
                except Exception as exc:  # the request's own error is the one to raise
                    if not self._loads_refused(concrete, exc, loads):
                        log.warning("could not send the load of %s: %s", concrete, exc)
            raise
        return handle, [*loads, prepared], concrete

    def _build(
        self,
        concrete: str,
        cfg: EffectiveConfig,
        vmodel_id: str | None,
        kwargs: dict,
        priority: str | None,
        timeout_ms: float | None,
        max_timeout_ms: float | None,
    ) -> tuple[MeshResult, Prepared]:
        headers = {MODEL_HEADER: concrete, SENT_AT_HEADER: time.time()}
        if vmodel_id is not None:
            headers[VMODEL_HEADER] = vmodel_id
        if timeout_ms is None:
            timeout_ms = cfg.value("default_timeout_ms") or None
            if max_timeout_ms is not None:
                timeout_ms = min(timeout_ms or max_timeout_ms, max_timeout_ms)
        replies = self._reply_listener()
        handle = MeshResult(str(uuid4()), app=self.app)
        prepared = self._publisher.prepare(
            handle.id,
            self.keys.model_queue(concrete),
            kwargs,
            priority=PRIORITIES[priority or cfg.value("default_priority")],
            headers=headers,
            shadow=f"{INFER_TASK}[{concrete}]",
            reply_to=replies.key,
            expires_at=headers[SENT_AT_HEADER] + timeout_ms / 1000.0 if timeout_ms else None,
        )
        # measured on the body about to be sent: an estimate beforehand would cost as much
        self._check_size(prepared.body_size)
        replies.watch(handle)
        return handle, prepared

    def _request_alone(self, messages: list[Prepared], concrete: str, exc: Exception) -> list[Prepared] | None:
        """What to push again after the push of `messages` failed with `exc`: the request
        alone when the load command ahead of it was refused (`_loads_refused`), else None (the
        error is the request's)."""
        if len(messages) < 2 or not self._loads_refused(concrete, exc, messages[:-1]):
            return None
        return messages[-1:]

    def _loads_refused(self, concrete: str, exc: Exception, loads: Sequence[Prepared]) -> bool:
        """True when a push of load commands (`loads`) failed because this producer's Redis
        user may not write a worker's queue: their placements are undone, the workers place
        that load instead, and the request is to be pushed alone. Under the documented ACLs
        (docs/security.md) such a producer cannot claim a load either, so it never gets here;
        a hand-made user that may claim loads can (tests/faults/test_acl.py)."""
        if not is_permission_error(exc):
            return False
        workers = [w for w in (self.keys.worker_from_queue(p.queue) for p in loads) if w is not None]
        self.router.loads_refused(concrete, exc, workers)
        return True

    def _reply_listener(self) -> ReplyListener:
        """This process's reply list and listener (a forked child gets its own)."""
        replies = self._replies
        if replies is not None and replies.pid == os.getpid():
            return replies
        with self._replies_lock:
            if self._replies is None or self._replies.pid != os.getpid():
                backend = self.app.backend
                self._replies = ReplyListener(
                    redis_client(self.redis_url, retry=False, master_name=self.settings.sentinel_master),
                    self.keys, backend.get_key_for_task,
                    jsonwire.loads if backend.content_type == "application/json" else backend.decode,
                )
            return self._replies

    # ---- vmodels
    # ModelMesh's vmodel API (kserve/modelmesh docs/vmodels.md; ours: docs/vmodels.md); the work is
    # in mesh/control/vmodels.py.

    @property
    def vmodels(self) -> VModelManager:
        """The vmodel store and transition driver of this mesh."""
        manager = self.__dict__.get("_vmodel_manager")
        if manager is None:
            manager = self.__dict__["_vmodel_manager"] = VModelManager(self.app, self.store)
        return manager

    @_management
    def set_vmodel(
        self,
        vmodel_id: str,
        target_model_id: str,
        model_info: ModelInfo | dict | None = None,
        auto_delete_target_model: bool = False,
        update_only: bool = False,
        load_now: bool = False,
        force: bool = False,
        sync: bool = False,
        expected_target_model_id: str | None = None,
        owner: str | None = None,
        *,
        timeout: float = SYNC_TIMEOUT_S,
    ) -> VModelStatus:
        """Create a vmodel or set its target (ModelMesh's setVModel, every field).

        The active model keeps serving until the target is loaded on as many copies as the
        active has (unless `force`; at once if the active has no copy). `model_info` registers
        the target (with `auto_delete_target_model` it is deleted once no vmodel references
        it); `expected_target_model_id` makes the change a compare-and-set; `sync` waits for
        the transition (or, for a new vmodel with `load_now`, for the load) and raises
        DeadlineExceeded after `timeout` seconds.
        """
        validate_id(vmodel_id, "vmodel")
        validate_id(target_model_id)
        info = None
        if model_info is not None:
            try:
                info = ModelInfo.model_validate(model_info)
            except ValidationError as exc:
                raise InvalidArgument(f"invalid model_info for {target_model_id!r}: {exc}") from None
            validate_uri(info.uri, info.storage_key)
            _check_runtime(info.runtime)
        if timeout <= 0:
            raise InvalidArgument("timeout must be positive")
        try:
            return self.vmodels.set_vmodel(
                vmodel_id,
                target_model_id,
                model_info=info,
                auto_delete_target_model=auto_delete_target_model,
                update_only=update_only,
                load_now=load_now,
                force=force,
                sync=sync,
                expected_target_model_id=expected_target_model_id,
                owner=owner,
                timeout=timeout,
            )
        finally:
            # this client's next request through the vmodel sees the change (others within
            # routing.VMODEL_TTL_S), also when a sync wait ended in an error after a switch
            self.router.forget_vmodel(vmodel_id)

    def get_vmodel_status(self, vmodel_id: str, owner: str | None = None) -> VModelStatus:
        """Status NOT_FOUND | DEFINED | TRANSITIONING | TRANSITION_FAILED, both models' states
        and copies; `.transition_status` etc. in ModelMesh Serving's words."""
        return self.vmodels.status(vmodel_id, owner)

    @_management
    def delete_vmodel(self, vmodel_id: str, owner: str | None = None) -> None:
        """Delete a vmodel (idempotent; another owner's vmodel is left alone). Models it
        auto-created are deleted once nothing references them."""
        try:
            self.vmodels.delete(vmodel_id, owner)
        finally:
            self.router.forget_vmodel(vmodel_id)

    def list_vmodels(self) -> list[VModelRecord]:
        return self.vmodels.list()


def _log_failed_load_push(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not send the load placed for a cancelled request: %s", future.exception())


def _many_items(inputs: Sequence[Any], raw: bool) -> list[list[dict]]:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not inputs:
        raise InvalidArgument("infer_many needs a non-empty list with one inputs entry per request")
    stacked = decode_stacked(inputs)
    if stacked is not None:
        # alike V2 tensors, validated at once by the check the worker applies: sent in the
        # form asked for, listed ones as given or cut raw from the array that check made
        if "raw" in inputs[0][0]:
            return list(inputs) if raw else [encode_inputs(x) for x in inputs]
        return raw_items(*stacked) if raw else list(inputs)
    return [encode_inputs(x, raw) for x in inputs]


def _with_outputs(kwargs: dict, outputs: Sequence[Any] | None) -> dict:
    if outputs is not None:
        kwargs["outputs"] = encode_output_names(outputs)
    return kwargs


def _default_app() -> Celery:
    from mesh.app import app

    return app


def _check_runtime(name: str) -> None:
    if name not in RUNTIME_NAMES:
        raise InvalidArgument(f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIME_NAMES))}")


def raise_for_item(item: dict) -> dict:
    """An `infer_many` result entry: its outputs, or the typed error it carries, raised."""
    err = item.get("error")
    if err is None:
        return item
    cls = getattr(mesh.errors, err.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, mesh.errors.MeshError)):
        cls = mesh.errors.InferenceError
    raise cls(err.get("message", ""))
