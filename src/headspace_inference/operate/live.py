"""One app's live state: the call feed behind /api/inference/events and the Prometheus
metrics behind /metrics (at the ``metrics_path`` the host gives init_app, if any).

``register_live(app)`` (called by ``register_routes``) hooks the app's service to both: one
``Console`` per app, kept in the extension's state for the app (``AppState.console``), fed
by the call log's committed-rows hook and the spend guard's event hook.
"""

from __future__ import annotations

import importlib.util

from flask import Blueprint, Flask, Response, current_app

from ..app_state import app_state, service_for
from ..inference.service import InferenceService, at_exit
from .feed import Feed, transport_for
from .http import ensure_started, error_response, register_error_handlers, require_token
from .metrics import Metrics

# Open event streams per process: each holds one of gunicorn's threads for as long as it is
# open (``headspace-inference serve --threads``, 8 by default), so the default leaves half of
# them to the API. Raise it with the app's INFERENCE_EVENT_STREAMS, together with --threads.
DEFAULT_MAX_STREAMS = 4


class Console:
    """One app's console state: its service's live feed and its metrics."""

    def __init__(
        self,
        service: InferenceService,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        keepalive_seconds: float = 15.0,
    ) -> None:
        self.service = service
        self.feed = Feed(
            service.database.sessions,
            transport_for(service.settings, service.database),
            max_streams=max_streams,
            keepalive_seconds=keepalive_seconds,
        )
        service.recorder.on_committed(self.feed.committed)
        service.on_budget_event(self.feed.announce)
        self.metrics = Metrics(service) if metrics_installed() else None
        service.recorder.on_close(self.close)
        # Registered after the service's own close at exit, so it runs first: it flushes
        # the call log itself, then publishes what the daemon publisher has not.
        self._cancel_exit_hook = at_exit(self, Console.drain)

    def close(self) -> None:
        """End the feed's and the metrics' threads and every stream (with the service)."""
        self.feed.drain()
        self.feed.close()
        if self.metrics is not None:
            self.metrics.close()
        self._cancel_exit_hook()

    def drain(self, timeout: float = 5.0) -> None:
        """Get the calls recorded so far into the database and their events published."""
        self.service.recorder.flush(timeout)
        self.feed.drain()


def console_for(app: Flask) -> Console:
    """The app's console, made on first use from its service."""
    state = app_state(app)
    if state.console is None:
        state.console = Console(
            service_for(app),
            max_streams=int(app.config.get("INFERENCE_EVENT_STREAMS", DEFAULT_MAX_STREAMS)),
            keepalive_seconds=float(app.config.get("INFERENCE_EVENT_KEEPALIVE_SECONDS", 15.0)),
        )
    console: Console = state.console
    return console


def current_console() -> Console:
    """The current app's console."""
    return console_for(current_app)


# Not under the API's prefix: Prometheus scrapes /metrics by convention. Registered at the
# host's metrics_path (the standalone app's is /metrics).
metrics_bp = Blueprint("inference_metrics", __name__)
register_error_handlers(metrics_bp)
metrics_bp.before_request(ensure_started)
# The API's token rule: with api.token set, a scrape sends it as a bearer token.
metrics_bp.before_request(require_token)


@metrics_bp.get("")
def metrics() -> Response:
    """Prometheus text format."""
    metrics = current_console().metrics
    if metrics is None:  # not registered without the extra; kept for the type checker
        return error_response(404, "metrics need the metrics extra")
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


def metrics_installed() -> bool:
    """Whether the metrics extra (prometheus_client) is installed; /metrics is served only
    then, and nothing else depends on it."""
    return importlib.util.find_spec("prometheus_client") is not None


def register_live(app: Flask) -> None:
    """Hook the app's service to the feed and the metrics as it starts, before its first
    call, so no committed call is missed."""
    service_for(app).on_start(lambda: console_for(app))
