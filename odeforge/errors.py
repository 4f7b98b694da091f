"""What the client raises: the API's problem documents as :class:`ProblemError`, and transport
failures (no connection, no answer in time) as :class:`ServiceUnreachable` / :class:`RequestTimeout`.

Every one of them is an :class:`OdeforgeError`, and ``str(exc)`` is one line fit for a terminal
(``404 job not found: no job with id '...'``), which is what ``odeforge`` prints after ``error:``.
"""

from __future__ import annotations

from typing import Any


class OdeforgeError(Exception):
    """Base class of every error the client raises."""


class ProblemError(OdeforgeError):
    """The API answered with an error status; carries its RFC 9457 problem document.

    Attributes:
        status: the HTTP status (int).
        problem: the whole problem+json body (dict); ``{"status": ..., "detail": <body text>}`` when
            the answer was not JSON (a proxy's error page, say).
        type, title, detail: the problem's fields (``type`` is a URL ending in a slug such as
            ``job-not-found``).
        errors: field-level reasons, ``[{"field": "solver.rtol", "reason": "..."}]`` (empty if none).
        slug: the last part of ``type`` (``job-not-found``), or None for ``about:blank``.
    """

    def __init__(self, status: int, problem: dict[str, Any], *, method: str = "", url: str = ""):
        self.status = int(status)
        self.problem = problem
        self.type = str(problem.get("type") or "about:blank")
        self.title = str(problem.get("title") or "")
        self.detail = problem.get("detail")
        self.errors: list[dict[str, str]] = [e for e in problem.get("errors") or [] if isinstance(e, dict)]
        self.slug = self.type.rstrip("/").rsplit("/", 1)[-1] if self.type != "about:blank" else None
        self.method, self.url = method, url
        super().__init__(self.message())

    def message(self) -> str:
        """One line: ``<status> <what>: <detail>`` plus any field reason the detail does not name."""
        what = self.slug.replace("-", " ") if self.slug else (self.title.lower() or "error")
        detail = str(self.detail) if self.detail else ""
        extra = [f"{e.get('field')}: {e.get('reason')}" for e in self.errors if str(e.get("field")) not in detail]
        text = f"{self.status} {what}"
        if detail:
            text += f": {detail}"
        if extra:
            text += f" [{'; '.join(extra)}]"
        return " ".join(text.split())  # one line, whatever the server put in it


class ServiceUnreachable(OdeforgeError, ConnectionError):
    """No connection to the API (refused, unknown host, network down). ``url`` is the base URL tried."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"cannot connect to {url} ({reason})")


class RequestTimeout(OdeforgeError, TimeoutError):
    """The API accepted the connection but did not answer within the client's ``timeout``."""

    def __init__(self, url: str, timeout: float | None):
        self.url, self.timeout = url, timeout
        super().__init__(f"no answer from {url} within {timeout:g} s" if timeout else f"no answer from {url}")
