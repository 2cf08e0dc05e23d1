"""GET <page_path> (the standalone app's /inference): the operator page, served only where
the host's init_app(page_path=...) puts it. Besides /status, /usage and the call log, it reads
cost per day by model from <url_prefix>/usage/daily (operate/daily.py); the template is
given the API's address, wherever url_prefix put it.

The page itself holds no data: it is a template and two static files (no build step, no
CDN; operators' dashboards run on closed networks), and its script reads everything from the
API with ``Authorization: Bearer <token>`` when ``api.token`` is set. The browser keeps the
token in sessionStorage (asked for once per tab): never in a URL, so never in an access
log, and not in a cookie, so no other site's page can make the browser present it. The live
feed is read with fetch() rather than EventSource, which cannot send the header.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, url_for

from ..operate.calls import STATUSES
from ..operate.http import current_service, ensure_started

# Registered at the host's page_path (the standalone app's is /inference).
console_bp = Blueprint(
    "inference_console",
    __name__,
    template_folder="templates",
    static_folder="static",
)
console_bp.before_request(ensure_started)

# The page loads its own script and stylesheet and fetches its own API, nothing else: no
# inline script or style, no other origin, no frame around it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@console_bp.after_request
def security_headers(response: Response) -> Response:
    """The page's (and its static files') security headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@console_bp.get("")
def page() -> str:
    """The operator page (it fetches its data itself)."""
    settings = current_service().settings
    return render_template(
        "inference_console.html",
        # The API's address as this request reaches it (the app's script root included).
        api=url_for("inference_api.status").removesuffix("/status"),
        levels=settings.levels,
        statuses=STATUSES,
        token_required=settings.api.token is not None,
    )
