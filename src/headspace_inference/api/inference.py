"""GET /api/inference/status, GET /api/inference/usage and their OpenAPI document.

Routes only read state: nothing here waits on OpenRouter beyond the health check's own
short, shared, cached probe.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from ..db import DATABASE_AWAY
from ..inference.service import InferenceService
from ..inference.usage import UsageQuery, usage_report
from ..models import MAX_INTEGER

bp = Blueprint("inference_api", __name__, url_prefix="/api/inference")

USAGE_PARAMS = ("since", "until", "level", "model", "project_id")


class BadParameter(ValueError):
    """A query parameter that cannot be used; the message names it."""


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message, "status": status})
    response.status_code = status
    return response


def database_away(exc: Exception, what: str) -> Response:
    """503 for a database that does not answer (not a 500: the service is fine): ``what``
    cannot be done now, and the driver's first line saying why."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
    return _error(503, f"database unreachable, {what}: {detail}")


def _service() -> InferenceService:
    """This app's service (the extension's, or create_app()'s)."""
    service: InferenceService = current_app.extensions["inference"]
    return service


@bp.before_request
def _require_token() -> Response | None:
    token = _service().settings.api.token
    if token is None or request.endpoint == "inference_api.openapi":
        return None
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        response = _error(401, "a valid 'Authorization: Bearer <api.token>' header is required")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return None


@bp.get("/status")
def status() -> Response:
    """Service health, configuration and live statistics."""
    # The service answers from its cached health checks: no request waits on OpenRouter.
    return jsonify(_service().status())


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


def parse_usage_query(args: Any, levels: tuple[str, ...]) -> UsageQuery:
    """The usage query the request's parameters describe; BadParameter names a bad one.
    ``levels`` are the configured ones."""
    f = parse_filters(args, USAGE_PARAMS, levels)
    return UsageQuery(f.since, f.until, f.level, f.model, f.project_id)


@bp.get("/usage")
def usage() -> Response:
    """Calls, tokens, cost, cache hits, errors and latency over a window."""
    service = _service()
    try:
        query = parse_usage_query(request.args, service.settings.levels)
    except BadParameter as exc:
        return _error(400, str(exc))
    try:
        with service.database.sessions() as session:
            return jsonify(usage_report(session, query))
    except DATABASE_AWAY as exc:
        return database_away(exc, "usage cannot be read now")


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of these endpoints."""
    settings = _service().settings
    return jsonify(openapi_document(settings.levels, token_required=settings.api.token is not None))


def openapi_document(levels: tuple[str, ...], *, token_required: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.0 description of /status and /usage for the configured ``levels``; with
    ``token_required`` (api.token set) both declare bearer authentication and their 401."""
    number = {"type": "number"}
    integer = {"type": "integer"}
    nullable_int = {"type": "integer", "nullable": True}
    counts = {"type": "object", "additionalProperties": integer}
    money = {"type": "object", "additionalProperties": number}
    # Percentiles are the upper bound (ms) of the histogram bucket holding them; null when
    # there are no calls, or when the percentile lies past the last bound (60 s).
    latency = {
        "type": "object",
        "required": ["mean", "p50", "p90", "p99"],
        "properties": {
            k: {"type": "number", "nullable": True} for k in ("mean", "p50", "p90", "p99")
        },
    }
    kinds = ("input", "output", "cached_input", "cache_write", "reasoning")
    tokens = {
        "type": "object",
        "required": list(kinds),
        "properties": dict.fromkeys(kinds, integer),
    }
    disagreement = dict.fromkeys(
        ("estimated", "reported", "difference", "reported_without_estimate"), number
    )
    error = {
        "type": "object",
        "required": ["error", "status"],
        "properties": {"error": {"type": "string"}, "status": integer},
    }
    status_schema = {
        "type": "object",
        "required": [
            "enabled",
            "state",
            "openrouter",
            "models",
            "rate_limits",
            "cache",
            "call_log",
        ],
        "properties": {
            "enabled": {"type": "boolean"},
            "state": {"type": "string", "enum": ["healthy", "degraded", "disabled"]},
            "reason": {"type": "string", "nullable": True},
            "openrouter": {
                "type": "object",
                "required": ["reachable", "checked_at", "latency_ms", "error"],
                "properties": {
                    "reachable": {"type": "boolean"},
                    "checked_at": {"type": "string", "format": "date-time", "nullable": True},
                    "latency_ms": nullable_int,
                    "error": {"type": "string", "nullable": True},
                    "state": {"type": "string"},
                    "base_url": {"type": "string"},
                    "api_key_configured": {"type": "boolean"},
                },
            },
            "models": {
                "type": "object",
                "required": list(levels),
                "properties": {level: {"type": "string"} for level in levels},
            },
            "fallback_models": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            },
            "provider": {"type": "object", "nullable": True},
            "unpriced_models": {"type": "array", "items": {"type": "string"}},
            "rate_limits": {
                "type": "object",
                "required": ["calls_per_minute", "tokens_per_minute", "max_wait_seconds"],
                "properties": {
                    "calls_per_minute": integer,
                    "tokens_per_minute": integer,
                    "max_wait_seconds": number,
                    "window_seconds": number,
                    "usage": {"type": "object"},
                },
            },
            "cache": {
                "type": "object",
                "required": ["enabled", "ttl_seconds"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "ttl_seconds": number,
                    "max_entries": integer,
                    "stats": {"type": "object"},
                },
            },
            "retry": {"type": "object"},
            "queue": {"type": "object"},
            "call_log": {
                "type": "object",
                "required": ["state", "pending", "write_failures"],
                "properties": {
                    "state": {"type": "string", "enum": ["ok", "spooling", "stopped"]},
                    "pending": integer,
                    "write_failures": integer,
                    "last_error": {"type": "string", "nullable": True},
                },
            },
        },
    }
    usage_schema = {
        "type": "object",
        "required": [
            "total_calls",
            "calls_by_level",
            "calls_by_model",
            "total_input_tokens",
            "total_output_tokens",
            "total_cost",
            "cost_by_model",
            "cost_by_level",
            "cache_hits",
            "errors",
            "window",
            "filters",
            "tokens_by_level",
            "upstream_reported_cost",
            "saved_cost",
            "latency_ms",
        ],
        "properties": {
            "window": {
                "type": "object",
                "required": ["since", "until"],
                "properties": {
                    "since": {"type": "string", "format": "date-time", "nullable": True},
                    "until": {"type": "string", "format": "date-time", "nullable": True},
                },
            },
            "filters": {
                "type": "object",
                "required": ["level", "model", "project_id"],
                "properties": {
                    "level": {"type": "string", "nullable": True},
                    "model": {"type": "string", "nullable": True},
                    "project_id": nullable_int,
                },
            },
            "total_calls": integer,
            "calls_by_level": counts,
            "calls_by_model": counts,
            "total_input_tokens": integer,
            "total_output_tokens": integer,
            "total_cached_input_tokens": integer,
            "total_cache_write_tokens": integer,
            "total_reasoning_tokens": integer,
            "tokens_by_level": {"type": "object", "additionalProperties": tokens},
            "tokens_by_model": {"type": "object", "additionalProperties": tokens},
            "total_cost": number,
            "cost_by_model": money,
            "cost_by_level": money,
            "upstream_reported_cost": number,
            "cache_discount": number,
            "cache_discount_by_model": money,
            # Models whose estimate and OpenRouter's figure differ (over the calls with both)
            # by more than 1%, or that OpenRouter charged for calls without an estimate.
            "cost_disagreements": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": list(disagreement),
                    "properties": disagreement,
                },
            },
            "cache_hits": integer,
            "saved_cost": number,
            "errors": integer,
            "latency_ms": {"type": "object", "additionalProperties": latency},
        },
    }

    def json_of(ref: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": ref}}}

    responses_common: dict[str, Any] = {}
    security: dict[str, Any] = {}
    if token_required:
        responses_common["401"] = {
            "description": "the request lacks 'Authorization: Bearer <api.token>'",
            "content": json_of("#/components/schemas/Error"),
        }
        security["security"] = [{"bearerToken": []}]
    time_param = {"type": "string", "format": "date-time"}
    from .calls import calls_openapi  # the call log's endpoints (calls.py imports this module)
    from .daily import daily_openapi

    calls_paths, calls_schemas = calls_openapi(levels, security, responses_common)
    calls_paths.update(daily_openapi(security, responses_common))
    return {
        "openapi": "3.0.3",
        "info": {"title": "Claude Headspace inference API", "version": "1.0.0"},
        "paths": {
            "/api/inference/status": {
                "get": {
                    "summary": "Service health, configuration and live statistics",
                    "operationId": "getStatus",
                    **security,
                    "responses": {
                        "200": {
                            "description": "status",
                            "content": json_of("#/components/schemas/Status"),
                        },
                        **responses_common,
                    },
                }
            },
            "/api/inference/openapi.json": {
                "get": {
                    "summary": "This document (public, even when api.token is set)",
                    "operationId": "getOpenApi",
                    "responses": {
                        "200": {
                            "description": "the OpenAPI 3.0 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/api/inference/usage": {
                "get": {
                    "summary": "Usage and cost over a window [since, until)",
                    "operationId": "getUsage",
                    **security,
                    "parameters": [
                        {"name": "since", "in": "query", "schema": time_param},
                        {"name": "until", "in": "query", "schema": time_param},
                        {
                            "name": "level",
                            "in": "query",
                            "schema": {"type": "string", "enum": list(levels)},
                        },
                        {
                            "name": "model",
                            "in": "query",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        },
                        {
                            "name": "project_id",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_INTEGER,
                            },
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "usage",
                            "content": json_of("#/components/schemas/Usage"),
                        },
                        "400": {
                            "description": "a bad parameter, named in error",
                            "content": json_of("#/components/schemas/Error"),
                        },
                        "503": {
                            "description": "the database cannot be read right now",
                            "content": json_of("#/components/schemas/Error"),
                        },
                        **responses_common,
                    },
                }
            },
            **calls_paths,
        },
        "components": {
            "schemas": {
                "Status": status_schema,
                "Usage": usage_schema,
                "Error": error,
                **calls_schemas,
            },
            # The document itself is public: it describes the API, not its data.
            "securitySchemes": {"bearerToken": {"type": "http", "scheme": "bearer"}},
        },
    }
