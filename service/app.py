"""The FastAPI application factory.

``create_app(settings)`` builds an app whose stores, broker publisher and model cache are created in
its lifespan (schema created on start). ``uvicorn --factory service.app:create_app`` reads settings
from the environment.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from jobs.settings import Settings, get_settings
from service.auth import ApiKeyMiddleware
from service.container import Services
from service.errors import install_handlers
from service.limits import BodySizeLimitMiddleware, document_json_bodies
from service.observability import ApiMetrics
from service.openapi_docs import document_common_responses, install_offline_docs
from service.outages import install_outage_handlers
from service.routers import api_router
from service.routers.dashboard import install_dashboard
from service.runtime import freeze_startup_heap

API_DESCRIPTION = """Train Neural ODEs and continuous normalizing flows on request.

POST a job (`/v1/jobs`), poll it, read its metrics and checkpoints, and query a trained CNF for
log-densities and samples. Errors are `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured app; ``settings`` defaults to the environment (``ODEFORGE_*``)."""
    settings = settings or get_settings()
    metrics = ApiMetrics()  # built with the app: the middleware needs it before the lifespan runs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings, metrics)
        app.state.services = services
        freeze_startup_heap()  # full GC passes would otherwise stall every request (service/runtime.py)
        # Requeues jobs whose worker was lost (expired lease) and republishes lost messages.
        reconciler = services.reconciler().start()
        app.state.reconciler = reconciler
        try:
            yield
        finally:
            reconciler.stop()
            services.close()

    # /docs and /redoc are served with local assets (install_offline_docs), not FastAPI's CDN pages
    app = FastAPI(title="odeforge", version="0.1.0", description=API_DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_offline_docs(app)
    install_handlers(app)
    install_outage_handlers(app)
    document_json_bodies(app)  # before the common responses: they see these routes' request bodies
    document_common_responses(app)
    app.include_router(api_router())
    install_dashboard(app)  # the web dashboard at / (service/dashboard/, offline)
    # Innermost middleware (added first): it refuses a declared Content-Length over the limit before
    # the body is read and counts bodies streamed without one; its streamed 413 reaches the
    # problem+json handler directly, not wrapped by the middlewares around it. JSON bodies have the
    # tighter limit ODEFORGE_MAX_JSON_BYTES, uploads ODEFORGE_MAX_BODY_BYTES.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       max_json_bytes=settings.max_json_bytes)
    # API keys are checked before any body is read.
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_owners)
    app.middleware("http")(metrics.middleware)
    return app


logging.getLogger("odeforge").setLevel(logging.INFO)
