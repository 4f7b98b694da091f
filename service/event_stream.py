"""Server-Sent Events of one job, read from the job store's event log (:mod:`jobs.events`).

The stream polls ``job_events`` by ``id`` (in a worker thread: the event loop never waits on the
database), so every API replica can serve any job, and a client that reconnects with the id of the
last event it got (``Last-Event-ID``) receives exactly the events after it. Wire format (WHATWG
HTML, "Server-sent events"): one ``retry:`` line first (a browser ``EventSource`` reconnects after
that many milliseconds), then per event ``id: <int>``, ``event: <type>``, ``data: <JSON>`` and a
blank line; ``: heartbeat`` comment lines while nothing happens. The stream ends after the job's
final ``status`` event (or at once when resumed after it), or when the job is deleted.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from jobs import events
from jobs.status import TERMINAL
from jobs.store import JobStore
from jobs.tables import Job

RETRY_MS = 2000  # what EventSource waits before reconnecting
HEARTBEAT = b": heartbeat\n\n"


def format_event(event_id: int, type_: str, data: dict) -> bytes:
    """One SSE message. ``data`` is compact JSON on one line (JSON escapes newlines inside strings)."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\nevent: {type_}\ndata: {body}\n\n".encode()


async def job_events(store: JobStore, job: Job, *, after_id: int, poll_s: float,
                     heartbeat_s: float) -> AsyncIterator[bytes]:
    """The SSE byte chunks of ``job``'s events with ``id > after_id``, until its final status.

    Args:
        after_id: the last event id the client has (0: from the start).
        poll_s: seconds between polls of the job store while nothing is new.
        heartbeat_s: seconds of silence after which a heartbeat comment is sent.
    """
    yield f"retry: {RETRY_MS}\n\n".encode()
    last, last_sent = after_id, time.monotonic()
    while True:
        batch = await run_in_threadpool(events.read, store.sessions, job.seq, after_id=last)
        if not batch:
            # Nothing new: has the job ended (or gone)? Its final events commit with its final status,
            # so a job read as finished has them visible now; none left means the stream is over.
            row = await run_in_threadpool(store.get_job, job.id)
            if row is None:
                return
            if row.status in TERMINAL:
                batch = await run_in_threadpool(events.read, store.sessions, job.seq, after_id=last)
                if not batch:
                    return
        for event_id, type_, data in batch:
            yield format_event(event_id, type_, data)
            last, last_sent = event_id, time.monotonic()
            if type_ == "status" and data.get("status") in TERMINAL:
                return
        if batch:
            continue  # there may be more right away
        if time.monotonic() - last_sent >= heartbeat_s:
            yield HEARTBEAT
            last_sent = time.monotonic()
        await asyncio.sleep(poll_s)
