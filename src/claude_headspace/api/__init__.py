"""HTTP endpoints."""

from __future__ import annotations

from flask import Flask

from .inference import bp


def register_blueprints(app: Flask) -> None:
    """Attach every blueprint to ``app``."""
    app.register_blueprint(bp)
