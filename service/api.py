"""The HTTP API: one app factory with a lifespan (the full-stack FastAPI template's shape).

``create_app(settings)`` builds the app; its lifespan limits torch's threads, loads every
model's newest valid snapshot (or the pinned one), opens the Redis client, and starts the
background tasks: the snapshot poller (hot swap and pins, :mod:`service.serving`), a Redis ping
that keeps ``normprop_api_redis_up`` current, the delayed-label expiry sweep and served-metrics
refresh (:mod:`service.routes_labels`), and the dashboard's sampler (:mod:`service.dashboard`).
Routes live in ``service/routes_*.py`` and ``service/dashboard.py``.

Run it with ``python -m service api``, or
``python -m uvicorn --factory service.api:create_app``.

The two middlewares are plain ASGI (no ``BaseHTTPMiddleware``: it costs a task per request):
the outer one times every request into the latency histogram; the inner one enforces
``max_body_bytes`` on both the declared ``Content-Length`` and the bytes actually streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import dashboard, routes_admin, routes_ingest, routes_labels, routes_models, routes_predict
from .api_metrics import ApiMetrics
from .redis_options import tls_options
from .routes_common import (ApiError, ApiState, api_state, describe_deployment, error_response,
                            json_response)
from .serving import ModelServer
from .settings import Settings

__all__ = ["create_app", "DEFAULT_REDIS_URL"]

log = logging.getLogger("normprop.api")

#: Used when NP_REDIS_URL is unset and the API runs on its own (``python -m service run``
#: always sets it).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: How often the API pings Redis (the ``redis_up`` gauge, and ingest's fast 503).
REDIS_PING_SECONDS = 1.0


class MetricsMiddleware:
    """Times each HTTP request into ``normprop_api_request_duration_seconds``."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.histogram = metrics.request_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The route's template, never the raw path: bounded label cardinality.
            path = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(path, scope["method"], str(status),
                                  scope.get("np.model", "")).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, declared (Content-Length) or streamed (chunked).

    The body is read here, up to the limit, and replayed to the app, so a route never sees a
    partial or oversized body.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(413, "body_too_large",
                              f"the request body is over the limit of {self.limit} bytes",
                              headers={"Connection": "close"})
        await resp(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await self._too_large(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _redis_client(settings: Settings, retries: int | None = None) -> Redis:
    """The API's Redis client. Fail fast (by default one quick retry for a stale pooled
    connection): ingest should answer 503 promptly rather than hold the client through
    redis-py's default backoff. ``retries=0`` is for non-idempotent writes (see ``ApiState``).
    """
    tries = min(settings.redis_retries, 1) if retries is None else retries
    return Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL,
                          socket_timeout=settings.redis_socket_timeout,
                          socket_connect_timeout=settings.redis_connect_timeout,
                          retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), tries),
                          health_check_interval=0, **tls_options(settings))


async def _ping(state: ApiState) -> bool:
    return await _ping_error(state) is None


async def _ping_error(state: ApiState) -> str | None:
    """None if Redis answers a PING, else why not (for the log: a wrong password, a TLS
    failure and a refused connection read differently; redis-py's messages hold no password)."""
    assert state.redis is not None
    try:
        await asyncio.wait_for(state.redis.ping(),
                               timeout=min(state.settings.redis_socket_timeout, 2.0))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "down" for this ping
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _watch_redis(state: ApiState) -> None:
    """Ping Redis every second; the gauge and ``redis_ok`` follow (recovery is automatic)."""
    previous: bool | None = None
    while True:
        error = await _ping_error(state)
        ok = error is None
        if ok != previous and (previous is not None or not ok):
            if ok:
                log.warning("Redis is reachable again")
            else:
                log.warning("Redis is unreachable (%s)", error)
        previous = ok
        state.redis_ok = ok
        state.metrics.redis_up.set(1 if ok else 0)
        await asyncio.sleep(REDIS_PING_SECONDS)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ApiState = app.state.np
    settings = state.settings
    # Small matrices: one thread avoids oversubscribing the cores the event loop needs.
    torch.set_num_threads(settings.torch_threads or 1)
    if settings.redis_url is None:
        log.warning("NP_REDIS_URL is not set; using %s", DEFAULT_REDIS_URL)
    state.redis = _redis_client(settings)
    state.redis_writes = _redis_client(settings, retries=0)
    # Known before the first request; the API starts (and serves) even if Redis is down.
    state.redis_ok = await _ping(state)
    metrics_up = state.metrics.redis_up
    metrics_up.set(1 if state.redis_ok else 0)
    await state.server.refresh()  # serve the newest valid snapshot from the first request
    # Long-lived startup objects (torch, pydantic, routes) leave the GC's generations: fewer
    # and shorter collection pauses in the p99 latency.
    gc.collect()
    gc.freeze()
    state.tasks = [asyncio.create_task(state.server.run(), name="snapshot-poller"),
                   asyncio.create_task(_watch_redis(state), name="redis-ping"),
                   asyncio.create_task(routes_labels.watch_labels(state), name="labels"),
                   asyncio.create_task(dashboard.watch_dashboard(state, app.state.np_dashboard),
                                       name="dashboard")]
    try:
        yield
    finally:
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.redis.aclose()
        await state.redis_writes.aclose()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        path = request.url.path[:100]
        if exc.status_code == 404:
            message = f"no route matches {path!r} (the routes are listed at /docs)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {path!r}; allowed: {allowed}"
        return error_response(exc.status_code, code, message,
                              dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "validation_error", f"{where}: {first.get('msg', 'invalid')}",
                              detail=[{"loc": list(e.get("loc", ())), "msg": e.get("msg")}
                                      for e in errors][:20])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


#: The routes that call ``require_key``, and whose key.
_KEY_ROLES = {"/predict": "predict", "/ingest": "ingest", "/label": "ingest",
              "/admin/models/{name}/versions": "admin", "/admin/models/{name}/pin": "admin",
              "/admin/models/{name}/rollback": "admin", "/admin/models/{name}/reload": "admin"}


class Health(BaseModel):
    status: str = Field(..., examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(..., description="ready or not_ready")
    models: dict[str, int | None] = Field(..., description="each model's served version")
    redis: bool = Field(..., description="the last Redis ping succeeded")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app for ``settings`` (read from ``NP_*`` environment variables by default)."""
    settings = settings or Settings()
    # uvicorn configures its own loggers only; the service's go to the root logger.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(settings.log_level)
    metrics = ApiMetrics()
    state = ApiState(settings=settings, metrics=metrics, server=ModelServer(settings, metrics))
    metrics.watch_served(lambda: state.served)
    app = FastAPI(title="NormProp Stream", version="0.1.0", lifespan=_lifespan,
                  description="Online-learning NormProp models: ingest labelled samples into a "
                              "Redis stream, predict with the newest snapshot.")
    app.state.np = state
    app.state.np_dashboard = dashboard.DashboardHistory(settings.dashboard_history)
    _install_error_handlers(app)
    app.include_router(routes_predict.router)
    app.include_router(routes_ingest.router)
    app.include_router(routes_models.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_labels.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", tags=["ops"], summary="The process is alive", response_model=Health)
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz", tags=["ops"], summary="Every model serves a version (503 otherwise)",
             response_model=Readiness, responses={503: {
                 "model": Readiness, "description": "a model has no snapshot yet",
                 "headers": {"Retry-After": {"description": "seconds to wait",
                                             "schema": {"type": "integer", "minimum": 0}}}}})
    async def readyz(request: Request) -> Response:
        st = api_state(request)
        versions = {name: (s.version if s else None) for name, s in st.server.served().items()}
        ready = st.server.ready()
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "models": versions,
                                "redis": st.redis_ok}
        return json_response(body, 200 if ready else 503,
                             None if ready else {"Retry-After": "1"})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             response_class=PlainTextResponse,
             response_description="the Prometheus text exposition format")
    async def metrics_route(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        st = api_state(request)
        await routes_labels.refresh_served(st)  # model-wide figures, current at each scrape
        return Response(generate_latest(st.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    # Outermost last: metrics time everything, 413s included.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, then served from the cache
            describe_deployment(FastAPI.openapi(app), settings, _KEY_ROLES)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app
