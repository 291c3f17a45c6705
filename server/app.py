"""``create_app``: the registry ASGI app (routes, auth, body guard, migrations, token bootstrap, reconciler).

The same app serves HTTP (``oprd-ci serve``) and in-process CLI calls (``local_actor`` set: requests without
a token act as that local admin on the local database).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute

from server.auth import CurrentPrincipal, TokenCache, authorize, ensure_token, parse_token_list
from server.body_guard import BodyGuard
from server.db import Database
from server.errors import RegistryError
from server.migrate import upgrade
from server.mlflow_guard import MlflowGuard
from server.mlflow_mirror import MlflowMirror
from server.reconciler import Reconciler
from server.retirement import RetirementWatcher
from server.routes import admin, aliases, events, triggers, versions
from server.settings import ServerSettings
from server.webhooks import Deliverer

log = logging.getLogger(__name__)


def _bootstrap_tokens(db: Database, settings: ServerSettings) -> None:
    entries = parse_token_list(settings.tokens) if settings.tokens else []
    if settings.admin_token:
        entries.append(("bootstrap-admin", "admin", settings.admin_token))

    def tx(s):  # type: ignore[no-untyped-def]
        for name, role, secret in entries:
            ensure_token(s, name=name, role=role, secret=secret)

    if entries:
        db.transact(tx)


def create_app(
    settings: ServerSettings | None = None, *, local_actor: str | None = None, run_reconciler: bool = True
) -> FastAPI:
    """Build the app. Migrations run and tokens are ensured here (synchronously), so a returned app is ready.

    Args:
        settings: deployment settings; default ``ServerSettings()`` from the environment.
        local_actor: in-process mode; token-less requests act as admin ``local:<local_actor>``.
        run_reconciler: start the background MLflow reconciler and webhook deliverer in the lifespan (tests may
            drive them by hand).
    """
    settings = settings or ServerSettings()
    db = Database(settings)
    upgrade(db.engine)
    _bootstrap_tokens(db, settings)
    reconciler = Reconciler.from_settings(db, settings)
    deliverer = Deliverer(db, settings)  # the event outbox -> webhooks (server.webhooks)
    watcher = (
        RetirementWatcher(db, settings.retirement_interval_s) if settings.retirement_interval_s else None
    )
    guard = MlflowGuard.from_settings(settings)
    public_docs = (
        settings.public_docs
        if settings.public_docs is not None
        else not (settings.tokens or settings.admin_token)
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if run_reconciler:
            reconciler.start()
            deliverer.start()
            if watcher is not None:
                watcher.start()
        try:
            yield
        finally:
            reconciler.stop()
            deliverer.stop()
            if watcher is not None:
                watcher.stop()
            guard.shutdown()
            db.dispose()

    app = FastAPI(
        title="oprd-ci registry",
        version="1",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
        responses={401: {"description": "missing or invalid token"}, 403: {"description": "role too low"}},
        # With tokens configured the API description is not public either (OPRD_PUBLIC_DOCS overrides).
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )
    app.state.settings, app.state.db, app.state.reconciler, app.state.local_actor = (
        settings,
        db,
        reconciler,
        local_actor,
    )
    app.state.mlflow_guard, app.state.token_cache = guard, TokenCache(settings.token_cache_s)
    app.state.deliverer = deliverer
    for router in (versions.router, aliases.router, admin.router, events.router, triggers.router):
        app.include_router(router)
    if not public_docs:
        _token_protected_docs(app)

    @app.exception_handler(RegistryError)
    async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    return app


def _token_protected_docs(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind the read role (rules in ``server.auth.ACCESS_RULES``)."""

    @app.get("/openapi.json", name="openapi", include_in_schema=False)
    def openapi(_: CurrentPrincipal) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", name="docs", include_in_schema=False)
    def docs(_: CurrentPrincipal) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", name="redoc", include_in_schema=False)
    def redoc(_: CurrentPrincipal) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def prepare_for_workers(settings: ServerSettings | None = None) -> None:
    """Run once before starting several worker processes: migrate the registry database, ensure the tokens, and
    open the MLflow stores (a local MLflow database migrates on first use), so the workers do not race to
    create the same schemas."""
    settings = settings or ServerSettings()
    app = create_app(settings, run_reconciler=False)
    try:
        if settings.mlflow_enabled:
            MlflowMirror(settings.mlflow_tracking_uri).aliases("oprd-warm-up")
    finally:
        app.state.mlflow_guard.shutdown()
        app.state.db.dispose()


def app_from_env() -> FastAPI:
    """uvicorn factory: ``uvicorn --factory server.app:app_from_env``."""
    return create_app()


def iter_api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every ``APIRoute`` of an app, also inside included routers (FastAPI >= 0.16x wraps those)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from iter_api_routes(route.original_router.routes)
