"""HTTP endpoints, and the one error shape they answer in."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, jsonify
from werkzeug.exceptions import HTTPException

from ..console import register_console
from . import calls, daily, events  # noqa: F401  (their routes are on bp)
from .inference import bp

log = logging.getLogger(__name__)


def register_blueprints(app: Flask) -> None:
    """Attach every blueprint to ``app``."""
    app.register_blueprint(bp)
    register_console(app)


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
