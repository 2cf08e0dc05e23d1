"""The application factory: config, database, services, blueprints, CLI."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import load_dotenv
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from . import logsafe
from .config import Settings, check_spool_dir, load_settings
from .db import Database

log = logging.getLogger(__name__)


def load_env_file() -> None:
    """Load ``./.env`` into the environment; variables already set win.

    Production machines keep OPENROUTER_API_KEY (and perhaps DATABASE_URL) there.
    """
    load_dotenv(Path.cwd() / ".env", override=False)


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
    if (database.is_sqlite or settings.database.auto_migrate) and not _running_db_command():
        database.upgrade()
    app.extensions["headspace.database"] = database

    from .inference.service import InferenceService

    spool = settings.inference.spool_path
    spool_dir = Path(spool) if spool else Path(app.instance_path) / "call-log"
    check_spool_dir(spool_dir)
    service = InferenceService.from_settings(settings, database, spool_dir=spool_dir)
    service.start()
    app.extensions["inference"] = service
    # Flush the call log however the process ends normally (a weak reference: an app
    # that is dropped, as tests do, does not stay alive for the exit hook's sake).
    _close_at_exit(service)

    _register_error_handlers(app)

    from .api import register_blueprints

    register_blueprints(app)

    from .cli import register_commands

    register_commands(app)
    return app


def _running_db_command(argv: list[str] | None = None) -> bool:
    """Whether this process runs `headspace db ...` / `flask db ...`: those commands manage
    the schema themselves, so start-up must not migrate (a downgrade would be undone)."""
    args = list(sys.argv[1:] if argv is None else argv)
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option in ("--app", "-A", "--env-file", "-e") and args:
            args.pop(0)
    return bool(args) and args[0] == "db"


def _close_at_exit(service: Any) -> None:
    ref = weakref.ref(service)
    owner = os.getpid()

    def close() -> None:
        # Only in the process that built it: a child forked from this one inherits the hook
        # but not the service's threads, and the locks they held at the fork stay held.
        live = ref()
        if live is not None and os.getpid() == owner:
            live.close()

    atexit.register(close)


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
