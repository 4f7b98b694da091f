"""Request body size limit, enforced on the bytes actually received.

A ``Content-Length`` above the limit is refused before the body is read; a body sent without one
(``Transfer-Encoding: chunked``) is counted as it streams in and refused as soon as it passes the
limit, so no request makes the API buffer more than ``ODEFORGE_MAX_BODY_BYTES``. The refusal is a
413 ``application/problem+json``.
"""

from __future__ import annotations

from typing import Any, Callable

from service.errors import ProblemError, problem


def _too_large(limit: int) -> dict[str, Any]:
    """The fields of the 413 problem (sent by this middleware or raised through the app's handler)."""
    return dict(slug="body-too-large", errors=[{"field": "body", "reason": f"larger than {limit} bytes"}],
                headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """Pure ASGI middleware refusing request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # a malformed length is the server's (uvicorn's) problem to reject
            if too_large:
                response = problem(413, f"request body larger than {self.max_bytes} bytes", instance=scope["path"],
                                   **_too_large(self.max_bytes))
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the app's body parsing: FastAPI passes HTTPException (ProblemError is
                    # one) through to the problem+json handler, so the client gets a 413, not a 400 or a 500.
                    raise ProblemError(413, detail=f"request body larger than {self.max_bytes} bytes",
                                       **_too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)
