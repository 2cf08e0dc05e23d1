"""HTTP endpoints."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    """Attach every blueprint to ``app``."""
    from .inference import bp

    app.register_blueprint(bp)
