"""Opaque page tokens for keyset pagination (a cursor, not an offset: stable while rows are added)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

from service.errors import ProblemError


def encode(kind: str, value: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode(kind: str, token: str | None) -> int | None:
    """The integer cursor in ``token`` (None for no token); 422 problem for a malformed token."""
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        got_kind, value = raw.split(":", 1)
        if got_kind != kind:
            raise ValueError(kind)
        cursor = int(value)
        if not 0 <= cursor < 2**62:  # database integers are 64-bit; a forged cursor must not reach SQL
            raise ValueError(value)
        return cursor
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(422, "invalid-request", "page_token is not a token this endpoint returned",
                           errors=[{"field": "page_token", "reason": "malformed or from another endpoint"}]) from None


def encode_key(kind: str, at: datetime, key: str) -> str:
    """A token for a ``(timestamp, id)`` keyset cursor (rows without an integer sequence: data sets)."""
    micros = (at - _EPOCH) // _MICROSECOND  # exact: no float rounding
    return base64.urlsafe_b64encode(f"{kind}:{micros}:{key}".encode()).decode().rstrip("=")


def decode_key(kind: str, token: str | None) -> tuple[datetime, str] | None:
    """The ``(timestamp, id)`` cursor in ``token`` (None for no token); 422 problem for a malformed token."""
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        got_kind, micros, key = raw.split(":", 2)
        if got_kind != kind or not key.isalnum() or len(key) > 64:
            raise ValueError(kind)
        return _EPOCH + int(micros) * _MICROSECOND, key
    except (ValueError, OverflowError, OSError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(422, "invalid-request", "page_token is not a token this endpoint returned",
                           errors=[{"field": "page_token", "reason": "malformed or from another endpoint"}]) from None
