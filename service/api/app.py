"""The FastAPI application: ``create_app(settings, engine=None)``.

Nothing heavy happens at import time or in ``create_app``. The lifespan starts the engine in the
background so ``/healthz`` answers while the backbone loads and ``/readyz`` says 503 until it is warmed.
Shutdown: readiness turns 503 first (``begin_drain``, called by the CLI on SIGTERM), uvicorn lets
in-flight requests finish, then the lifespan stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Scope

from service.api import errors
from service.api.deps import Authorize, Client
from service.api.middleware import (
    BodyLimitMiddleware,
    CloseWhenDraining,
    HttpMetrics,
    MetricsMiddleware,
)
from service.api.routes import (
    audit,
    backbone,
    console,
    evaluate,
    health,
    predict,
    tasks,
    tokens,
    v2,
    versions,
)
from service.engine.protocol import EngineAPI, StartupError, StoreUnusable
from service.settings import Settings
from service.tenants.backends import open_backend
from service.tenants.metrics import TenantMetrics
from service.tenants.service import Tenants

log = logging.getLogger("service.api")


def build_engine(settings: Settings) -> EngineAPI:
    """The real engine and store for ``settings`` (imported here: torch loads only when serving). The
    settings are the engine's config as they are: the same names from ``SSF_*`` to the engine."""
    from service.engine.engine import Engine
    from service.store import open_store

    try:
        store = open_store(settings.store, settings.keep_versions, settings.audit_max_records)
    except (ValueError, OSError) as e:
        raise StoreUnusable(f"--store: {e}") from e
    return Engine(
        settings.model, settings.weights, store, config=settings, pretrained=settings.weights is None
    )


def body_limit(settings: Settings) -> Callable[[Scope], int]:
    """Uploads may be as large as a delta; every other body is bounded by ``max_body_bytes``."""

    def limit_for(scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/tasks":
            return settings.max_upload_body_bytes
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith("/evaluate"):
            return settings.eval_max_body_bytes  # labelled images: many at once, or one archive
        return settings.max_body_bytes

    return limit_for


async def _start_engine(app: FastAPI, settings: Settings) -> None:
    try:
        if app.state.engine is None:
            app.state.engine = await asyncio.to_thread(build_engine, settings)
        await app.state.engine.start()
    except Exception as e:
        app.state.start_error = str(e) or type(e).__name__
        # bad input (weights that do not fit, no CUDA, an unreadable store) needs the message, not a traceback
        expected = isinstance(e, StartupError)
        log.error("engine failed to start: %s", app.state.start_error, exc_info=None if expected else e)
        on_fatal: Callable[[str], None] | None = app.state.on_fatal
        if on_fatal is not None:
            on_fatal(app.state.start_error)


def begin_drain(app: FastAPI) -> None:
    """Turn readiness to 503 so load balancers stop sending new requests; in-flight ones go on."""
    if not app.state.draining:
        log.info("draining: readiness is now 503")
    app.state.draining = True


def create_app(settings: Settings, engine: EngineAPI | None = None) -> FastAPI:
    """The app for ``settings``. Without ``engine`` the lifespan builds the real one from the settings;
    either way the lifespan calls ``engine.start()`` and ``engine.stop()`` at the end,
    so pass an engine that is not started yet."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(_start_engine(app, settings), name="ssf-engine-start")
        await app.state.tenants.start()
        try:
            yield
        finally:
            begin_drain(app)
            await app.state.tenants.stop()
            if not starter.done():
                starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
            engine: EngineAPI | None = app.state.engine
            if engine is not None:
                try:
                    await engine.stop()
                except Exception:
                    log.exception("engine stop failed")
            log.info("stopped")

    app = FastAPI(
        title="ssf-serve",
        summary="Serve many SSF tasks on one frozen backbone",
        version="1",
        lifespan=lifespan,
        dependencies=[Authorize],  # every route: the route table of service/api/auth.py
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.draining = False
    app.state.start_error = None
    app.state.on_fatal = None
    app.state.http_metrics = HttpMetrics()
    secret = settings.token_secret.get_secret_value().encode() if settings.token_secret else None
    app.state.tenants = Tenants(open_backend(settings.store), secret, settings.tenant_refresh_s)
    app.state.tenant_metrics = TenantMetrics(app.state.http_metrics.registry)

    errors.install(app)
    for router in (health.router, backbone.router, tasks.router, v2.router, console.router, tokens.router):
        app.include_router(router)
    app.include_router(evaluate.router)
    app.include_router(versions.router)
    app.include_router(audit.router)
    # Predict is open unless client tokens are configured; only then does its schema declare auth.
    # The protocol's infer routes are predict by another name: the same rule.
    for router in (predict.router, v2.infer_router):
        app.include_router(router, dependencies=[Client] if settings.client_token_list else [])
    # Last added is outermost: metrics see every response, including the body limit's 413s.
    app.add_middleware(CloseWhenDraining, draining=lambda: app.state.draining)
    app.add_middleware(
        BodyLimitMiddleware, limit_for=body_limit(settings), timeout_s=settings.request_timeout_s
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.http_metrics)
    return app
