"""The HTTP API: ``create_app(context)`` builds it; nothing happens at import."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from mi2b2 import __version__
from mi2b2.api.docs import install_docs
from mi2b2.api.errors import ERROR_RESPONSES, install_error_handlers
from mi2b2.api.limits import BodyLimit
from mi2b2.api.routers import admin, audit, auth, cache, notifications, projects, requests, search
from mi2b2.api.routers import dicomweb as dicomweb_router
from mi2b2.api.routers import download as download_router
from mi2b2.api.routers import forward as forward_router
from mi2b2.api.routers import health as health_router
from mi2b2.api.routers import metrics as metrics_router
from mi2b2.api.routers import oidc as oidc_router
from mi2b2.api.routers import viewer as viewer_router
from mi2b2.api.schemas.common import Health
from mi2b2.services.context import ServiceContext
from mi2b2.web import pages as client_pages


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0] if route.tags else 'api'}_{route.name}"


def create_app(context: ServiceContext, worker: Any = None) -> FastAPI:
    """``worker``, when this process runs one, is woken as soon as work is queued."""
    openapi_url = "/api/v1/openapi.json"
    app = FastAPI(
        title="mi2b2",
        version=__version__,
        description="IRB-governed research access to the hospital PACS",
        generate_unique_id_function=_operation_id,
        openapi_url=openapi_url,
        docs_url=None,  # install_docs serves it with its assets, not from a CDN
        redoc_url=None,
    )
    install_docs(app, openapi_url)
    app.state.context = context
    app.state.worker = worker
    install_error_handlers(app)
    app.add_middleware(BodyLimit, context=context)  # every route: no body is read past the site's limits
    api = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
    for module in (auth, projects, search, requests, audit, admin, cache, notifications):
        api.include_router(module.router)
    api.include_router(cache.admin_router)
    api.include_router(forward_router.router)
    api.include_router(download_router.router)
    api.include_router(viewer_router.router)
    api.include_router(oidc_router.router)

    @api.get("/health", tags=["health"], response_model=Health)
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    app.include_router(api)
    app.include_router(health_router.router)  # /health/live and /health/ready, outside the versioned API
    app.include_router(metrics_router.router)  # /metrics, for Prometheus
    app.include_router(client_pages.router)  # the browser client, /app/
    app.include_router(viewer_router.page_router)  # the viewer page, /viewer/
    app.include_router(dicomweb_router.router, responses=ERROR_RESPONSES)  # /dicomweb/projects/{project}/...
    return app
