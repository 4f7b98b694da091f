"""Dependency outages as clean HTTP answers: a job store that cannot be reached is a 503, not a 500,
and a full disk (the database's or the artifact store's) is a 507, not a 500 or a 503.

SQLAlchemy raises ``OperationalError`` (connection refused or dropped, database not accepting
connections, SQLite "database is locked" past its busy timeout), ``InterfaceError`` (a connection the
driver already closed) and ``TimeoutError`` (pool exhausted). Each becomes a 503
``application/problem+json`` with ``Retry-After``; the pool's pre-ping replaces dead connections, so
requests succeed again as soon as the database is back, without a restart.

A database error caused by a full disk (SQLite ``SQLITE_FULL`` "database or disk is full", PostgreSQL
SQLSTATE 53100 ``disk_full``) and an ``OSError`` with ``ENOSPC``/``EDQUOT`` (an artifact write,
:class:`jobs.artifacts.InsufficientStorage`, or a temporary file) are a 507 ``insufficient-storage``
naming what is full: the database is reachable, retrying will not help until space is freed.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from jobs.artifacts import NO_SPACE_ERRNOS
from service.errors import problem_response

log = logging.getLogger("odeforge.api")

RETRY_AFTER_S = 5
_SQLITE_FULL = 13  # sqlite3 result code (the low byte of an extended code)
_PG_DISK_FULL = "53100"


def database_disk_full(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error is the database's disk being full (SQLite or PostgreSQL)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
        return True
    if _PG_DISK_FULL in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None)):
        return True
    text = str(orig if orig is not None else exc)
    return "database or disk is full" in text or "No space left on device" in text


def _disk_full(request: Request, reason: str, exc: BaseException) -> JSONResponse:
    log.error("storage full on %s %s: %s (%s)", request.method, request.url.path, reason,
              str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return problem_response(request, 507, f"not enough storage: {reason}", slug="insufficient-storage",
                            errors=[{"field": "storage", "reason": reason}])


def install_outage_handlers(app: FastAPI) -> None:
    """Register the 503 handlers for database outages and the 507 ones for full disks on ``app``."""

    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        if database_disk_full(exc):
            return _disk_full(request, "the job store's disk is full (database writes fail)", exc)
        log.warning("job store unavailable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return problem_response(request, 503, "the job store is unavailable, retry later", slug="database-unavailable",
                                headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _dbapi(request: Request, exc: DBAPIError) -> JSONResponse:
        if database_disk_full(exc):
            return _disk_full(request, "the job store's disk is full (database writes fail)", exc)
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            return await _database_down(request, exc)
        log.exception("database error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the service logged the details", slug="internal")

    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in NO_SPACE_ERRNOS:
            return _disk_full(request, f"the artifact disk is full ({os.strerror(exc.errno)})", exc)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal error; the service logged the details", slug="internal")

    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    app.add_exception_handler(PoolTimeoutError, _database_down)
    app.add_exception_handler(DBAPIError, _dbapi)
