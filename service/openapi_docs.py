"""Responses every operation can give, documented once in the OpenAPI schema.

Routes document their own outcomes (404, 409, 422...). Some answers come from the layers around
every route instead: the API-key check (401), the body size limit (413), a body that is not even
JSON text (400), an unreachable job store (503). Clients and schema-driven tools (schemathesis,
generated SDKs) should find those in the schema too, so they are added to each operation here, and
every error response is documented as ``application/problem+json``, the media type it is sent with.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_COMMON = {
    "401": "missing or unknown API key (only when ODEFORGE_API_KEYS is set)",
    "503": "job store or message broker unavailable; retry after Retry-After seconds",
}
_WITH_BODY = {
    "400": "request body is not parseable (not UTF-8 JSON text, or a broken multipart form)",
    "413": "request body larger than ODEFORGE_MAX_BODY_BYTES",
}
_PUBLIC = {"/healthz", "/readyz"}


def document_common_responses(app: FastAPI) -> None:
    """Wrap ``app.openapi`` so that each operation lists the responses of the layers around it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                extra = {} if path in _PUBLIC else dict(_COMMON)
                if path == "/readyz":
                    extra["503"] = _COMMON["503"]
                if "requestBody" in operation:
                    extra.update(_WITH_BODY)
                for status, description in extra.items():
                    operation["responses"].setdefault(status, {"description": description, "content": _PROBLEM})
                for status, response in operation["responses"].items():
                    # Every error body is problem+json (service.errors), whatever a route's
                    # ``responses=`` said: FastAPI files a bare ``model=Problem`` under application/json.
                    if status[:1] in ("4", "5"):
                        response["content"] = _PROBLEM
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- /docs and /redoc without the internet ---------------------------------------------------------
#: where the Swagger UI and ReDoc files are served from: the copies the ``fastapi-offline`` package
#: ships (FastAPI's own pages load them from a CDN, and are blank on a machine without internet)
DOCS_ASSETS = "/docs-assets"


def install_offline_docs(app: FastAPI) -> None:
    """Serve ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with every script, style sheet and icon
    from this server (``DOCS_ASSETS``); create the app with ``docs_url=None, redoc_url=None``."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            # no validator badge: it would ask validator.swagger.io about the schema
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png", with_google_fonts=False)
