"""API keys: with ``ODEFORGE_API_KEYS`` set, every endpoint but ``/healthz``, ``/readyz`` and the dashboard's page and assets (``/``,
``/dashboard/...``: static files, no data) needs
``Authorization: Bearer <key>``, and a job (or uploaded data set) belongs to the key that created it.

``ODEFORGE_API_KEYS`` is a comma-separated list of ``name:key`` (the name is the owner recorded on
jobs and shown in logs) or bare keys (owner ``key-<sha256 prefix>``; the key itself is never
stored). Keys must be at least 16 characters (checked when the settings are read:
:func:`jobs.settings.parse_api_keys`). A request for another owner's job gets the same 404
as an unknown id, so a key cannot probe which job ids exist (RFC 9110 section 15.5.5 allows a 404
in place of a 403 to hide a resource). Unset: no authentication, all jobs visible to every caller
(the embedded single-user default).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import problem

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/"})
#: the dashboard's static assets (no data: the page asks for the key and sends it on every /v1 call)
PUBLIC_PREFIXES = ("/dashboard/",)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the owner name of its API key (None when keys are off) and whether keys are on."""

    owner: str | None = None
    auth_enabled: bool = False

    @classmethod
    def of(cls, request: Request) -> "Caller":
        """The caller recorded by :class:`ApiKeyMiddleware` (a FastAPI dependency)."""
        state = request.scope.get("state", {})
        return cls(owner=state.get("owner"), auth_enabled=bool(state.get("auth_enabled")))

    def may_see(self, resource_owner: str | None) -> bool:
        """May the caller see a job/data set owned by ``resource_owner``? (Everyone may when keys are off.)"""
        return not self.auth_enabled or (resource_owner is not None and resource_owner == self.owner)

    def idempotency_key(self, key: str | None) -> str | None:
        """Idempotency keys live in one namespace per owner: another key's ``Idempotency-Key: 1`` must
        neither replay nor reveal this owner's job. Stored hashed (fits the column, leaks nothing)."""
        if key is None or self.owner is None:
            return key
        return "o:" + hashlib.sha256(f"{self.owner}\x1f{key}".encode()).hexdigest()


def _unauthorized(path: str, detail: str) -> JSONResponse:
    return problem(401, detail, instance=path, slug="unauthorized",
                   headers={"WWW-Authenticate": 'Bearer realm="odeforge"'})


class ApiKeyMiddleware:
    """Pure ASGI middleware: checks the bearer key, records the owner in ``scope["state"]``."""

    def __init__(self, app: Callable[..., Awaitable[None]], keys: dict[str, str]):
        self.app = app
        self.keys = keys

    def _owner(self, token: str) -> str | None:
        found = None
        for key, owner in self.keys.items():  # compare against every key: time does not tell which matched
            if hmac.compare_digest(key.encode(), token.encode()):
                found = owner
        return found

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["auth_enabled"] = True
        if scope["path"] not in PUBLIC_PATHS and not scope["path"].startswith(PUBLIC_PREFIXES):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                await _unauthorized(scope["path"], "missing 'Authorization: Bearer <API key>' header")(scope, receive,
                                                                                                      send)
                return
            owner = self._owner(token.strip())
            if owner is None:
                await _unauthorized(scope["path"], "unknown API key")(scope, receive, send)
                return
            state["owner"] = owner
        await self.app(scope, receive, send)
