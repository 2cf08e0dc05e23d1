"""The standalone app: a minimal host of its own around the extension.

Its own domain tables and history (standalone/), its configuration in the standalone
file's shape, and then the same ``Inference.init_app`` a host calls.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from ..cli import register_commands
from ..config_loading import load_env_file, load_settings
from ..extension import Inference
from ..operate.http import register_error_handlers
from ..operate.live import metrics_installed
from ..settings import Settings
from .database import standalone_database


def create_app(
    config_path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
) -> Flask:
    """Build the standalone app: settings, its database (migrated if SQLite or
    ``database.auto_migrate``), the service, its routes and commands, and start it."""
    load_env_file()
    if settings is None:
        settings = load_settings(config_path, overrides)
    app = Flask(__name__, instance_path=str(Path.cwd() / "instance"))
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep answers in the order built
    # An app of its own: the operator page and /metrics (with the metrics extra) at the
    # paths operators and Prometheus expect.
    service = Inference().init_app(
        app,
        settings=settings,
        database=standalone_database(settings.database),
        page_path="/inference",
        metrics_path="/metrics" if metrics_installed() else None,
    )
    register_error_handlers(app)
    register_commands(app)
    service.start()  # an app, not a library: it starts at once
    return app
