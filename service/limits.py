"""Request bodies: size limits enforced on the bytes actually received, and JSON parsed off the loop.

A ``Content-Length`` above the limit is refused before the body is read; a body sent without one
(``Transfer-Encoding: chunked``) is counted as it streams in and refused as soon as it passes the
limit. Multipart uploads may reach ``ODEFORGE_MAX_BODY_BYTES``; every other body (JSON) only
``ODEFORGE_MAX_JSON_BYTES`` (8 MiB by default): parsing JSON builds Python objects many times its
size and holds the interpreter while it runs. The refusal is a 413 ``application/problem+json``
naming the limit.

:func:`json_body` is the request body of the inference routes, whose bodies are the large ones (points,
images, series): read asynchronously, then parsed and validated by pydantic in one pass
(``model_validate_json``); a body over ``JSON_OFF_LOOP_BYTES`` is parsed on a worker thread, one such
body at a time, so a burst of large bodies queues there instead of stalling every other request on
the event loop. (A parse holds the GIL while it runs; what this bounds is how many run back to back
and that the loop gets to run between them: about 0.2 s per 8 MiB body on the test machine.)
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.errors import ProblemError, problem

M = TypeVar("M", bound=BaseModel)

JSON_OFF_LOOP_BYTES = 64 * 1024  #: JSON bodies larger than this are parsed on a worker thread
_JSON_BODIES: dict[str, type[BaseModel]] = {}  # models of json_body() routes, added to the OpenAPI components


def _too_large(limit: int, setting: str) -> dict[str, Any]:
    """The fields of the 413 problem (sent by this middleware or raised through the app's handler)."""
    return dict(slug="body-too-large", errors=[{"field": "body", "reason": f"larger than {limit} bytes ({setting})"}],
                headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """Pure ASGI middleware refusing request bodies over the limit (declared or streamed): ``max_bytes``
    for ``multipart/form-data`` (uploads), ``max_json_bytes`` (at most ``max_bytes``) for the rest."""

    def __init__(self, app: Callable, max_bytes: int, max_json_bytes: int | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.max_json_bytes = min(max_json_bytes or max_bytes, max_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            limit, setting = self.max_bytes, "ODEFORGE_MAX_BODY_BYTES"
        else:
            limit = self.max_json_bytes
            setting = "ODEFORGE_MAX_JSON_BYTES" if limit < self.max_bytes else "ODEFORGE_MAX_BODY_BYTES"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # a malformed length is the server's (uvicorn's) problem to reject
            if too_large:
                response = problem(413, f"request body larger than {limit} bytes ({setting})", instance=scope["path"],
                                   **_too_large(limit, setting))
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the app's body parsing: FastAPI passes HTTPException (ProblemError is
                    # one) through to the problem+json handler, so the client gets a 413, not a 400 or a 500.
                    raise ProblemError(413, detail=f"request body larger than {limit} bytes ({setting})",
                                       **_too_large(limit, setting))
            return message

        await self.app(scope, limited_receive, send)


def json_body(model: type[M]) -> Any:
    """``Depends`` giving the request's JSON body as ``model`` (see the module doc); pair it with
    ``openapi_extra=json_body_openapi(model)`` on the route. Invalid bodies are FastAPI's
    ``RequestValidationError`` (422 naming the field, e.g. ``points[0][1]``)."""
    _JSON_BODIES[model.__name__] = model

    async def parse(request: Request) -> M:
        raw = await request.body()
        try:
            if len(raw) <= JSON_OFF_LOOP_BYTES:
                return model.model_validate_json(raw)
            limiter = getattr(request.app.state, "json_parse_limiter", None)
            if limiter is None:  # one large parse at a time per app (made in the loop it serves)
                limiter = request.app.state.json_parse_limiter = anyio.CapacityLimiter(1)
            return await anyio.to_thread.run_sync(model.model_validate_json, raw, limiter=limiter)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    parse.__name__ = f"{model.__name__}_body"
    return Depends(parse)


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` documenting ``model`` as the route's required JSON request body."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def document_json_bodies(app: FastAPI) -> None:
    """Wrap ``app.openapi`` so that the models of :func:`json_body` routes are in the components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _JSON_BODIES.items():
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for sub, sub_doc in doc.pop("$defs", {}).items():
                components.setdefault(sub, sub_doc)
            components.setdefault(name, doc)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
