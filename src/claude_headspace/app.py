"""The application factory: config, database, services, blueprints, CLI."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from . import logsafe
from .api import register_blueprints
from .commands import register_commands
from .config import Settings, check_spool_dir, load_env_file, load_settings
from .db import Database
from .inference.service import InferenceService

log = logging.getLogger(__name__)


def create_app(
    config_path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
) -> Flask:
    """Build the Flask app: settings, database (migrated if embedded), services, routes."""
    load_env_file()
    if settings is None:
        settings = load_settings(config_path, overrides)
    logsafe.protect(settings.api_key)
    if settings.api.token is not None:
        logsafe.protect(settings.api.token.get_secret_value())

    app = Flask(__name__, instance_path=str(Path.cwd() / "instance"))
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep answers in the order built
    app.extensions["headspace.settings"] = settings

    database = Database(settings.database)
    if database.is_sqlite or settings.database.auto_migrate:
        database.upgrade()
    app.extensions["headspace.database"] = database

    spool_dir = settings.inference.spool_dir()
    check_spool_dir(spool_dir)
    service = InferenceService.from_settings(settings, database, spool_dir=spool_dir)
    service.start()
    app.extensions["inference"] = service

    _register_error_handlers(app)

    register_blueprints(app)

    register_commands(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        response = jsonify({"error": exc.description or exc.name, "status": exc.code})
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error in request")
        response = jsonify({"error": "internal error", "status": 500})
        response.status_code = 500
        return response
