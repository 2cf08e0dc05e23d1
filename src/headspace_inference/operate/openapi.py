"""GET /api/inference/openapi.json: the OpenAPI document of the JSON API."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from ..calllog.models import MAX_INTEGER
from .calls import calls_openapi
from .daily import daily_openapi
from .http import bp, current_service


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of these endpoints."""
    settings = current_service().settings
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
