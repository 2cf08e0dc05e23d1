"""GET /api/inference/events: the live call feed as Server-Sent Events.

One ``event: inference_call`` per recorded call (every process sharing the call log), its
``id:`` the row's id and its ``data:`` the CALL as /api/inference/calls shows it; a comment
line at least every 15 s keeps proxies from closing a quiet stream. A ``Last-Event-ID``
header replays the rows after that id from the table first, so a reconnecting client misses
nothing the table holds. The spend guard's events (a budget's warning or cap reached, the
storm breaker tripped, in any process) arrive as ``event: inference_budget`` with the event
as ``data:`` and no ``id:``, so they leave Last-Event-ID to the calls; they are not replayed.
Each stream holds one server thread while open (see console/).

It is not in the OpenAPI document: an endless stream has no response body to describe.
"""

from __future__ import annotations

import time

from flask import Response, request

from ..calllog.database import DATABASE_AWAY
from .calls import MAX_ROW_ID
from .feed import TooManyStreams, replay
from .http import bp, database_away, error_response
from .live import current_console


@bp.get("/events")
def events() -> Response:
    """The live feed of recorded calls and budget events."""
    if request.args:
        name = sorted(request.args)[0]
        return error_response(400, f"{name}: unknown parameter (this endpoint takes none)")
    last_id = None
    raw = request.headers.get("Last-Event-ID")
    if raw is not None and raw.strip():
        raw = raw.strip()
        if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_ROW_ID:
            return error_response(
                400, f"Last-Event-ID: must be a row id from this feed, got {raw!r:.40}"
            )
        last_id = int(raw)
    feed = current_console().feed
    try:
        stream = feed.open()
    except TooManyStreams as exc:
        response = error_response(503, f"{exc}; try again later")
        response.headers["Retry-After"] = "10"
        return response
    try:
        # A request's read, bounded like every other (database.read_timeout_seconds).
        replayed = (
            []
            if last_id is None
            else current_console().service.database.read(lambda s: replay(s, last_id))
        )
    except DATABASE_AWAY as exc:
        feed.close_stream(stream)
        return database_away(exc, "the feed cannot resume now")
    except BaseException:
        feed.close_stream(stream)
        raise
    response = Response(
        feed.sse(stream, replayed, monotonic=time.monotonic), mimetype="text/event-stream"
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response
