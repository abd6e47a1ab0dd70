"""The FastAPI application: settings validated at start-up, state built in the lifespan, small routers.

``uvicorn app.main:app`` serves the process's settings (the environment); tests build their own
application with :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.config import Settings, ensure_dirs, get_settings
from app.datasets import DatasetCache, register_builtin
from app.metrics import MetricsMiddleware, ServiceMetrics
from app.queue import JobQueue
from app.reaper import reap_forever
from app.registry import Registry, create_schema, make_engine
from app.routes import compare, datasets, health, jobs, models, recommend
from app.serving import ModelStore
from app.uploads import BodySizeLimit
from rcekd.checkpoint import CheckpointError

log = logging.getLogger("rcekd.api")


def restore_active_models(registry: Registry, store: ModelStore) -> None:
    """On start-up serve what was active before; a model that no longer loads is logged and skipped."""
    for dataset in registry.list_datasets():
        row = registry.active_model(dataset.id)
        if row is None:
            continue
        try:
            store.activate(dataset.id, row.id, row.directory)
        except (CheckpointError, OSError) as exc:
            log.error("model %s (active for %s) cannot be served: %s", row.id, dataset.id, exc)


async def registry_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is down or overloaded: a 503 the client may retry, not a 500 with a traceback.

    Other database errors (a violated constraint, bad SQL) are bugs: 500, logged with their traceback.
    """
    unavailable = isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError) or bool(
        getattr(exc, "connection_invalidated", False)
    )
    if not unavailable:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)
    log.error("%s %s: registry unavailable: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse(
        {"detail": f"the registry database is unavailable ({type(exc).__name__}); retry later"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_dirs(settings)
        engine = make_engine(settings.database_url)
        create_schema(engine)
        app.state.registry = Registry(engine)
        app.state.datasets = DatasetCache()
        app.state.default_dataset = register_builtin(settings, app.state.registry, app.state.datasets)[0]
        app.state.store = ModelStore()
        app.state.queue = JobQueue(settings)
        restore_active_models(app.state.registry, app.state.store)
        if settings.token_generated:
            log.warning("no RCEKD_API_TOKEN given; this run's token: %s", settings.api_token.get_secret_value())
        reaper = asyncio.create_task(
            reap_forever(app.state.registry, app.state.queue, settings),
            name="rcekd-reaper",
        )
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            engine.dispose()

    app = FastAPI(
        title="rcekd",
        summary="Distil a recommender into a small student with RCE-KD; serve it through ONNX + FAISS.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    for router in (health.router, datasets.router, jobs.router, models.router, recommend.router, compare.router):
        app.include_router(router)
    for error in (DBAPIError, PoolTimeoutError):
        app.add_exception_handler(error, registry_unavailable)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + (1 << 20))  # + multipart framing
    return app


def __getattr__(name: str) -> FastAPI:
    """``app.main:app`` for uvicorn, built on first access so importing this module has no side effects."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
