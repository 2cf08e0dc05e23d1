"""GET /inference: the operator page. Besides /status, /usage and the call log, it reads
cost per day by model from /api/inference/usage/daily (api/daily.py).

The page itself holds no data: it is a template and two static files (no build step, no
CDN; operators' dashboards run on closed networks), and its script reads everything from the
API with ``Authorization: Bearer <token>`` when ``api.token`` is set. The browser keeps the
token in sessionStorage (asked for once per tab): never in a URL, so never in an access
log, and not in a cookie, so no other site's page can make the browser present it. The live
feed is read with fetch() rather than EventSource, which cannot send the header.
"""

from __future__ import annotations

from flask import Blueprint, Flask, render_template

from ..operate.calls import STATUSES
from ..operate.http import current_service, ensure_started

console_bp = Blueprint(
    "inference_console",
    __name__,
    url_prefix="/inference",
    template_folder="templates",
    static_folder="static",
)
console_bp.before_request(ensure_started)


@console_bp.get("")
def page() -> str:
    """The operator page (it fetches its data itself)."""
    settings = current_service().settings
    return render_template(
        "inference_console.html",
        levels=settings.levels,
        statuses=STATUSES,
        token_required=settings.api.token is not None,
    )


def register_page(app: Flask) -> None:
    """Give the app the operator page."""
    app.register_blueprint(console_bp)
