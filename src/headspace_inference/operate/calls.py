"""GET /api/inference/calls (the call log, newest first, a page at a time) and
GET /api/inference/calls/<id> (one call with its answer).

Pages are cut by keyset, never by OFFSET: the order is (timestamp, id) descending, and a
page's ``next_cursor`` names the last row it showed, so the next page starts strictly after
it whatever was written meanwhile, and a deep page costs what the first one does (an index
range scan on ``timestamp``, or on ``(level, timestamp)`` / ``(project_id, timestamp)``
when those filters are given). Equal timestamps are ordered by id, so no row is shown twice
or skipped across pages.

By default the log does not keep a call's input text, only its hash (``input_hash``, the
cache key): inputs are the host's conversation text (user turns, code, secrets pasted into
them), up to ``max_input_chars`` each, and the log is kept for months and read by operators
who should not be reading users' turns. The hash still finds every call with the same
input. A host that wants its prompts kept sets ``inference.store_input_text`` (bounded by
``input_text_max_chars``, registered secrets redacted); ``search`` then finds words in them,
as it does in answers and purposes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

from flask import Response, jsonify, request
from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from ..calllog.call_json import DETAIL, DETAIL_COLUMNS, CallStatus, call_json, select_calls
from ..calllog.database import DATABASE_AWAY
from ..calllog.models import InferenceCall
from ..calllog.models.links import while_linked_row_exists
from .http import (
    BadParameter,
    bp,
    current_service,
    database_away,
    error_response,
    parse_filters,
    read_answer,
)

STATUSES: tuple[str, ...] = get_args(CallStatus)
CALLS_PARAMS = (
    "limit", "cursor", "level", "model", "status", "project_id", "since", "until", "search",
)  # fmt: skip
# The longest ``search`` accepted, in characters.
MAX_SEARCH_CHARS = 200
# Where ``search`` looks: case-insensitively, for the text anywhere in any of them.
SEARCHED = (InferenceCall.input_text, InferenceCall.result_text, InferenceCall.purpose)
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# The database's id column is a bigint on PostgreSQL: larger ids cannot exist.
MAX_ROW_ID = 2**63 - 1


@dataclass(frozen=True)
class CallsQuery:
    """One page of the log: filters, where the page starts, and how many rows."""

    limit: int = DEFAULT_LIMIT
    after: tuple[datetime, int] | None = None  # the last row of the previous page
    level: str | None = None
    model: str | None = None
    status: str | None = None
    project_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None


def encode_cursor(timestamp: datetime, row_id: int) -> str:
    """The opaque cursor that starts a page after the row (timestamp, id)."""
    raw = json.dumps([timestamp.astimezone(UTC).isoformat(), row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[datetime, int]:
    """The (timestamp, id) a cursor names; BadParameter if it is not one of ours."""
    try:
        if len(raw) > 200:
            raise ValueError("too long")
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        moment, row_id = data
        if not isinstance(moment, str) or type(row_id) is not int:
            raise ValueError("wrong shape")
        at = datetime.fromisoformat(moment)
        if at.tzinfo is None or not 0 < row_id <= MAX_ROW_ID:
            raise ValueError("out of range")
        # Inside the guard: an offset can take a time at the calendar's edge past year 1
        # or 9999 (OverflowError).
        at = at.astimezone(UTC)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise BadParameter("cursor: not a cursor from this API's next_cursor") from None
    return at, row_id


def parse_calls_query(args: Any, levels: tuple[str, ...]) -> CallsQuery:
    """The page the request's parameters describe; BadParameter names a bad one."""
    f = parse_filters(args, CALLS_PARAMS, levels)
    limit = DEFAULT_LIMIT
    if "limit" in args:
        raw = args["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadParameter(f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r:.40}")
        limit = int(raw)
    after = decode_cursor(args["cursor"]) if "cursor" in args else None
    status = args.get("status")
    if status is not None and status not in STATUSES:
        raise BadParameter(f"status: must be one of {', '.join(STATUSES)}, got {status!r:.40}")
    search = args.get("search")
    if search is not None and not 1 <= len(search) <= MAX_SEARCH_CHARS:
        raise BadParameter(f"search: must be 1 to {MAX_SEARCH_CHARS} characters long")
    return CallsQuery(
        limit, after, f.level, f.model, status, f.project_id, f.since, f.until, search
    )


def _contains(text: str) -> ColumnElement[bool]:
    # LIKE's wildcards in the text are matched as themselves.
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return or_(*(column.ilike(f"%{escaped}%", escape="\\") for column in SEARCHED))


def calls_page(session: Session, q: CallsQuery) -> dict[str, Any]:
    """``{"calls": [CALL, ...], "next_cursor": ... | None}`` for one page, newest first."""
    ts, row_id, row_project = InferenceCall.timestamp, InferenceCall.id, InferenceCall.project_id
    stmt = select_calls()
    for column, value in (
        (InferenceCall.level, q.level),
        (InferenceCall.model, q.model),
        (InferenceCall.status, q.status),
        (InferenceCall.project_id, q.project_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if q.since is not None:
        stmt = stmt.where(ts >= q.since)
    if q.until is not None:
        stmt = stmt.where(ts < q.until)
    if q.search is not None:
        stmt = stmt.where(_contains(q.search))
    if q.project_id is not None:
        stmt = stmt.where(*while_linked_row_exists(session, "project_id", row_project))
    if q.after is not None:
        at, last_id = q.after
        # "Strictly after (at, last_id) in descending order", written so that the
        # timestamp index bounds the scan: ts <= at, then the tie broken by id.
        stmt = stmt.where(and_(ts <= at, or_(ts < at, row_id < last_id)))
    # One row more than the page tells whether there is a next page.
    rows = session.execute(stmt.order_by(ts.desc(), row_id.desc()).limit(q.limit + 1)).all()
    page = rows[: q.limit]
    next_cursor = None
    if len(rows) > q.limit:
        next_cursor = encode_cursor(page[-1].timestamp, page[-1].id)
    return {"calls": [call_json(row) for row in page], "next_cursor": next_cursor}


def call_detail(session: Session, row_id: int) -> dict[str, Any] | None:
    """One CALL with its answer and the rest of its row, or None."""
    row = session.execute(select(*DETAIL_COLUMNS).where(InferenceCall.id == row_id)).one_or_none()
    return None if row is None else call_json(row, DETAIL)


@bp.get("/calls")
def calls() -> Response:
    """The call log, newest first, one page at a time."""
    levels = current_service().settings.levels
    return read_answer(
        lambda: parse_calls_query(request.args, levels), calls_page,
        "the call log cannot be read now",
    )  # fmt: skip


@bp.get("/calls/<int:row_id>")
def call(row_id: int) -> Response:
    """One call with its answer."""
    service = current_service()
    if request.args:
        name = sorted(request.args)[0]
        return error_response(400, f"{name}: unknown parameter (this endpoint takes none)")
    if not 0 < row_id <= MAX_ROW_ID:
        return error_response(404, f"no call with id {row_id}")
    try:
        found = service.database.read(lambda session: call_detail(session, row_id))
    except DATABASE_AWAY as exc:
        return database_away(exc, "the call log cannot be read now")
    if found is None:
        return error_response(404, f"no call with id {row_id}")
    return jsonify(found)
