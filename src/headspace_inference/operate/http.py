"""What every route of the JSON API shares: the blueprint, the error shape, the bearer
token check, the filters /usage and /calls take, and the 503 for an unreachable database.

Routes only read state: nothing here waits on OpenRouter beyond the health check's own
short, shared, cached probe.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from ..app_state import service_for
from ..calllog.database import DATABASE_AWAY
from ..calllog.models import MAX_INTEGER
from ..inference.service import InferenceService

Q = TypeVar("Q")

log = logging.getLogger(__name__)

# Registered under the url_prefix the host gives init_app (/api/inference by default).
bp = Blueprint("inference_api", __name__)


class BadParameter(ValueError):
    """A query parameter that cannot be used; the message names it."""


def error_response(status: int, message: str) -> Response:
    response = jsonify({"error": message, "status": status})
    response.status_code = status
    return response


def read_answer(parse: Callable[[], Q], read: Callable[[Session, Q], Any], what: str) -> Response:
    """What every read route does: ``parse()`` the request (a 400 naming a bad parameter),
    ``read`` in a session and answer its JSON (a 503 when the database does not answer,
    saying that ``what`` cannot be done now)."""
    try:
        query = parse()
    except BadParameter as exc:
        return error_response(400, str(exc))
    try:
        # Bounded (Database.read): a stalled database is a 503, not a held request.
        return jsonify(current_service().database.read(lambda session: read(session, query)))
    except DATABASE_AWAY as exc:
        return database_away(exc, what)


def database_away(exc: Exception, what: str) -> Response:
    """503 for a database that does not answer (not a 500: the service is fine): ``what``
    cannot be done now, and the driver's first line saying why."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
    return error_response(503, f"database unreachable, {what}: {detail}")


def current_service() -> InferenceService:
    """This app's service (the extension's, or create_app()'s), under the app's key."""
    return service_for(current_app)


def ensure_started() -> None:
    """Start the service on the first request to one of its routes: init_app starts
    nothing, and what a route reads (the call log, the feed, the metrics) runs once started."""
    service = current_service()
    if not service.started:
        service.start()


bp.before_request(ensure_started)


@bp.after_request
def no_sniffing(response: Response) -> Response:
    """Browsers take the API's answers as the type they say (JSON), never as a page."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


@bp.before_request
def require_token() -> Response | None:
    """With api.token set, every route but the OpenAPI document wants it as a bearer token."""
    token = current_service().settings.api.token
    if token is None or request.endpoint == "inference_api.openapi":
        return None
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        response = error_response(
            401, "a valid 'Authorization: Bearer <api.token>' header is required"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return None


# A window's edges are rounded to whole hours and days; keeping a day clear of datetime's
# limits means that rounding can never overflow.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def parse_time(name: str, raw: str) -> datetime:
    """An ISO 8601 time; naive means UTC."""
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise BadParameter(f"{name}: {raw!r:.60} is not an ISO 8601 date or time") from None
    except OverflowError:  # an offset that takes the time past year 1 or 9999
        moment = EARLIEST - timedelta(days=1)
    if not EARLIEST <= moment <= LATEST:
        raise BadParameter(f"{name}: must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}")
    return moment


@dataclass(frozen=True)
class Filters:
    """The filters /usage and /calls share: a window [since, until), level, model, project."""

    since: datetime | None
    until: datetime | None
    level: str | None
    model: str | None
    project_id: int | None


def parse_filters(args: Any, known: tuple[str, ...], levels: tuple[str, ...]) -> Filters:
    """The shared filters among ``args``, which may hold only ``known`` parameters, each
    once; BadParameter names a bad one. ``levels`` are the configured ones."""
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise BadParameter(f"{unknown[0]}: unknown parameter (known: {', '.join(known)})")
    for name in args:
        if len(args.getlist(name)) > 1:
            raise BadParameter(f"{name}: given more than once")
    since = parse_time("since", args["since"]) if "since" in args else None
    until = parse_time("until", args["until"]) if "until" in args else None
    if since is not None and until is not None and since > until:
        raise BadParameter("since: must not be later than until")
    level = args.get("level")
    if level is not None and level not in levels:
        raise BadParameter(f"level: must be one of {', '.join(levels)}, got {level!r:.40}")
    model = args.get("model")
    if model is not None and not (0 < len(model) <= 200):
        raise BadParameter("model: must be 1 to 200 characters")
    if model is not None and "\x00" in model:  # PostgreSQL refuses NUL in any string
        raise BadParameter("model: must not contain NUL characters")
    project_id = None
    if "project_id" in args:
        raw = args["project_id"]
        # Project ids are 32-bit (projects.id): a larger one cannot exist, and PostgreSQL
        # would refuse to compare it with the column.
        if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_INTEGER:
            raise BadParameter(
                f"project_id: must be an integer from 1 to {MAX_INTEGER}, got {raw!r:.40}"
            )
        project_id = int(raw)
    return Filters(since, until, level, model, project_id)


def register_error_handlers(target: Flask | Blueprint) -> None:
    """Answer errors as ``{"error", "status"}`` JSON: on the service's own blueprint always
    (inside a host, only its routes), and on the whole standalone app."""

    @target.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        response = jsonify({"error": exc.description or exc.name, "status": exc.code})
        response.status_code = exc.code or 500
        return response

    @target.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error in request")
        response = jsonify({"error": "internal error", "status": 500})
        response.status_code = 500
        return response


register_error_handlers(bp)
