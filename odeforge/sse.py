"""Server-Sent Events parsing (the WHATWG HTML "event stream" interpretation, section 9.2.6).

Kept apart from the client so it can be tested on its own text: lines in, :class:`Event` out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator


@dataclass(frozen=True)
class Event:
    """One server-sent event.

    Attributes:
        event: the event type (``"message"`` when the server sent no ``event:`` field).
        data: the ``data:`` lines joined by newlines, parsed as JSON when they are JSON (else the text).
        id: the stream's last event id when this event was dispatched (what ``Last-Event-ID`` resumes
            after), or None if the server sent none yet.
    """

    event: str
    data: Any
    id: str | None


@dataclass
class StreamState:
    """What a reconnection needs: the last event id seen and the server's ``retry:`` delay (ms)."""

    last_event_id: str | None = None
    retry_ms: int | None = None


def parse(lines: Iterable[str], state: StreamState) -> Iterator[Event]:
    """Events from the stream's ``lines`` (without line terminators); updates ``state`` as fields arrive.

    Comments (``:`` lines, e.g. heartbeats) are skipped; an event is dispatched at a blank line, and
    only if it had data (as the specification says); an unfinished event at the end is dropped.
    """
    data: list[str] = []
    event = ""
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                yield Event(event or "message", _decode(text), state.last_event_id)
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\0" not in value:
            state.last_event_id = value
        elif field == "retry" and value.isdigit():
            state.retry_ms = int(value)


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
