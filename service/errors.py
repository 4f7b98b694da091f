"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

One builder, :func:`problem`, writes every problem document: the exception handlers below, the
pure-ASGI middlewares that answer before a route runs (401 in ``service.auth``, 413 in
``service.limits``) and the outage handlers (503 in ``service.outages``).

``ProblemError`` is raised by routes and the service layer; it is a Starlette ``HTTPException``, so
it also passes through FastAPI's body parsing (a body refused while it streams in is a 413, not a
400). Handlers turn it, FastAPI's validation errors (422 with one ``{"field", "reason"}`` per failing
field) and Starlette's own HTTP errors (404 route, 405) into problem bodies. An unexpected exception
is still a problem document (500) and is logged with its traceback.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("odeforge.api")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://odeforge.dev/problems/"


class ProblemError(StarletteHTTPException):
    """An HTTP error with a problem type slug (e.g. ``job-not-found``) and optional field reasons."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, detail, headers)
        self.status, self.slug, self.errors = status, slug, errors


def problem(
    status: int,
    detail: str | None,
    *,
    instance: str,
    slug: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The problem+json response: ``type`` (``PROBLEM_BASE + slug``, or ``about:blank``), ``title``
    (the status's reason phrase), ``status``, ``detail``, ``instance`` (the request path) and, when
    given, ``errors``: ``[{"field": ..., "reason": ...}]``."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_response(request: Request, status: int, detail: str | None, **fields: Any) -> JSONResponse:
    """:func:`problem` for ``request`` (its path is the ``instance``)."""
    return problem(status, detail, instance=request.url.path, **fields)


def _union_tag(body: Any) -> str | None:
    """The job spec's ``model.type`` (the tag pydantic puts in the location of a model field's errors)."""
    model = body.get("model") if isinstance(body, dict) else None
    tag = model.get("type") if isinstance(model, dict) else None
    return tag if isinstance(tag, str) else None


def _field(loc: tuple[Any, ...], tag: str | None = None) -> str:
    """("body", "model", "cnf", "hidden_dims", 0) -> "model.hidden_dims[0]" (location and union tag dropped)."""
    parts: list[str] = []
    for i, p in enumerate(loc):
        if i == 0 and p in ("body", "query", "path", "header"):
            continue
        if isinstance(p, int):
            if parts:
                parts[-1] += f"[{p}]"
            else:
                parts.append(f"[{p}]")
        elif i > 0 and loc[i - 1] == "model" and p == tag:
            continue
        else:
            parts.append(str(p))
    return ".".join(parts) or "body"


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """One ``{"field": "model.hidden_dims[0]", "reason": ...}`` per failing field of a request."""
    tag = _union_tag(getattr(exc, "body", None))
    out = []
    for e in exc.errors():
        reason = e.get("msg", "invalid")
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        out.append({"field": _field(tuple(e.get("loc", ())), tag), "reason": reason})
    return out


def install_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # ProblemError and Starlette's own (unknown route, wrong method) alike
        return problem_response(request, exc.status_code, str(exc.detail), slug=getattr(exc, "slug", None),
                                errors=getattr(exc, "errors", None), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5])
        return problem_response(request, 422, detail, slug="invalid-request", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the service logged the details", slug="internal")
