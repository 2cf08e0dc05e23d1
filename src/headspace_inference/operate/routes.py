"""GET /api/inference/status and GET /api/inference/usage."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from .http import bp, current_service, parse_filters, read_answer
from .usage import UsageQuery, usage_report

USAGE_PARAMS = ("since", "until", "level", "model", "project_id")


@bp.get("/status")
def status() -> Response:
    """Service health, configuration and live statistics."""
    # The service answers from its cached health checks: no request waits on OpenRouter.
    return jsonify(current_service().status())


def parse_usage_query(args: Any, levels: tuple[str, ...]) -> UsageQuery:
    """The usage query the request's parameters describe; BadParameter names a bad one.
    ``levels`` are the configured ones."""
    f = parse_filters(args, USAGE_PARAMS, levels)
    return UsageQuery(f.since, f.until, f.level, f.model, f.project_id)


@bp.get("/usage")
def usage() -> Response:
    """Calls, tokens, cost, cache hits, errors and latency over a window."""
    levels = current_service().settings.levels
    return read_answer(
        lambda: parse_usage_query(request.args, levels), usage_report,
        "usage cannot be read now",
    )  # fmt: skip
