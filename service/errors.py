"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

``ProblemError`` is raised by routes; handlers turn it, FastAPI's validation errors (422 with one
``{"field", "reason"}`` per failing field) and Starlette's HTTP errors (404 route, 405) into problem
bodies. An unexpected exception is still a problem document (500) and is logged with its traceback.
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


class ProblemError(Exception):
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
        super().__init__(detail)
        self.status, self.slug, self.detail, self.errors, self.headers = status, slug, detail, errors, headers


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    slug: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_MODEL_TAGS = {"cnf", "planar", "odenet", "rknet", "resnet", "mlp"}


def _field(loc: tuple[Any, ...]) -> str:
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
        elif i > 0 and loc[i - 1] == "model" and p in _MODEL_TAGS:
            continue
        else:
            parts.append(str(p))
    return ".".join(parts) or "body"


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for e in exc.errors():
        reason = e.get("msg", "invalid")
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        out.append({"field": _field(tuple(e.get("loc", ()))), "reason": reason})
    return out


def install_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc.status, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5])
        return problem_response(request, 422, detail, slug="invalid-request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the service logged the details", slug="internal")
