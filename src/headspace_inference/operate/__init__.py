"""What operators read: the JSON API (/api/inference/...), the live feed and the metrics.

``register_blueprints(app)`` gives an app all of them; the shared HTTP pieces are http.py's.
"""

from __future__ import annotations

from flask import Flask

from . import calls, daily, events, openapi, routes  # noqa: F401  (their routes are on bp)
from .http import bp
from .live import register_live


def register_blueprints(app: Flask) -> None:
    """Attach the API and /metrics to ``app``, and hook its service to the live feed."""
    app.register_blueprint(bp)
    register_live(app)
