"""A job's events as Server-Sent Events (sse-starlette): GET /v1/jobs/{id}/events with Accept: text/event-stream.

Each event is one SSE message: `id` its seq (so a reconnecting browser's Last-Event-ID resumes after it), `event`
its kind, `data` the EventOut JSON. The stream polls the database every sse_poll_seconds, a page at a time,
through the request's Database like any read: a connection and a thread are held only while a page is read,
never between polls, so a stream costs one short indexed query per interval, and the event loop holds the rest.
It ends once the job has ended and its last event is sent. Each API process serves at most sse_max_streams at
once (503 too_many_streams past it, checked when a stream is asked for, so a burst may pass it by a few).
"""

from __future__ import annotations

import asyncio
import logging

from sse_starlette import EventSourceResponse, ServerSentEvent

from domain.errors import DomainError
from service.api.deps import CallerDatabase
from service.errors import TooManyStreams, http_status
from service.jobs import service
from service.schemas import EventOut
from service.settings import Settings

log = logging.getLogger(__name__)
EVENT_STREAM = "text/event-stream"
PAGE_EVENTS = 500
PING_SECONDS = 15  # a comment line this often keeps proxies from closing a quiet stream


class StreamCount:
    """Open streams in this process. Only the event loop's thread touches it."""

    def __init__(self) -> None:
        self.open = 0


def wants_stream(accept: str | None) -> bool:
    return EVENT_STREAM in (accept or "")


async def event_stream(
    db: CallerDatabase, settings: Settings, streams: StreamCount, job_id: str, after_seq: int
) -> EventSourceResponse:
    if streams.open >= settings.sse_max_streams:
        raise TooManyStreams(
            f"this API process already serves {streams.open} event streams; retry, or poll the JSON pages"
        )
    # The first page is read here, so an unknown job or key is a problem+json answer, not a broken stream.
    first = await db.read_rows(service.events_since, job_id, after_seq, PAGE_EVENTS)
    return EventSourceResponse(
        _messages(db, settings, streams, job_id, after_seq, first),
        ping=PING_SECONDS,
        headers={"Cache-Control": "no-store"},
    )


async def _messages(
    db: CallerDatabase, settings: Settings, streams: StreamCount, job_id: str, after_seq: int, page: tuple
):
    streams.open += 1
    try:
        while True:
            events, last = page
            for event in events:
                yield ServerSentEvent(EventOut.of(event).model_dump_json(), event=event.kind, id=str(event.seq))
            after_seq = events[-1].seq if events else after_seq
            if last:
                return
            if len(events) < PAGE_EVENTS:
                await asyncio.sleep(settings.sse_poll_seconds)
            page = await _next_page(db, settings, job_id, after_seq)
    finally:
        streams.open -= 1


async def _next_page(db: CallerDatabase, settings: Settings, job_id: str, after_seq: int) -> tuple:
    while True:
        try:
            return await db.read_rows(service.events_since, job_id, after_seq, PAGE_EVENTS)
        except DomainError as error:
            if (
                http_status(error) != 503
            ):  # a passing state (database busy or lost) waits; anything else ends the stream
                raise
            log.warning("event stream of %s: %s; polling again", job_id, error.detail)
            await asyncio.sleep(settings.sse_poll_seconds)
