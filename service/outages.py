"""Dependency outages as clean HTTP answers: a job store that cannot be reached is a 503, not a 500.

SQLAlchemy raises ``OperationalError`` (connection refused or dropped, database not accepting
connections, SQLite "database is locked" past its busy timeout), ``InterfaceError`` (a connection the
driver already closed) and ``TimeoutError`` (pool exhausted). Each becomes a 503
``application/problem+json`` with ``Retry-After``; the pool's pre-ping replaces dead connections, so
requests succeed again as soon as the database is back, without a restart.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.errors import problem_response

log = logging.getLogger("odeforge.api")

RETRY_AFTER_S = 5


def install_outage_handlers(app: FastAPI) -> None:
    """Register the 503 handlers for database outages on ``app``."""

    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return problem_response(request, 503, "the job store is unavailable, retry later", slug="database-unavailable",
                                headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _dbapi(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            return await _database_down(request, exc)
        log.exception("database error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the service logged the details", slug="internal")

    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    app.add_exception_handler(PoolTimeoutError, _database_down)
    app.add_exception_handler(DBAPIError, _dbapi)
