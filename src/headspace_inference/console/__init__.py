"""The operator console: the live call feed, the Prometheus metrics and the /inference page.

``register_console(app)`` (called by ``api.register_blueprints``) gives an app the page and
/metrics, and hooks this app's service to them: one ``Console`` per app, kept as
``app.extensions["inference_console"]``, fed by the call log's committed-rows hook.
"""

from __future__ import annotations

from flask import Flask, current_app

from ..inference.service import InferenceService, at_exit
from .feed import Feed, transport_for
from .metrics import Metrics, metrics_bp
from .views import console_bp

EXTENSION_KEY = "inference_console"

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
        self.metrics = Metrics(service)
        service.recorder.on_close(self.close)
        # Registered after the service's own close at exit, so it runs first: it flushes
        # the call log itself, then publishes what the daemon publisher has not.
        at_exit(self, Console.drain)

    def close(self) -> None:
        """End the feed's and the metrics' threads and every stream (with the service)."""
        self.feed.drain()
        self.feed.close()
        self.metrics.close()

    def drain(self, timeout: float = 5.0) -> None:
        """Get the calls recorded so far into the database and their events published."""
        self.service.recorder.flush(timeout)
        self.feed.drain()


def console_for(app: Flask) -> Console:
    """The app's console, made on first use from its service."""
    console: Console | None = app.extensions.get(EXTENSION_KEY)
    if console is None:
        console = Console(
            app.extensions["inference"],
            max_streams=int(app.config.get("INFERENCE_EVENT_STREAMS", DEFAULT_MAX_STREAMS)),
            keepalive_seconds=float(app.config.get("INFERENCE_EVENT_KEEPALIVE_SECONDS", 15.0)),
        )
        app.extensions[EXTENSION_KEY] = console
    return console


def current_console() -> Console:
    """The current app's console."""
    return console_for(current_app)


def register_console(app: Flask) -> None:
    """Give the app the page, and hook its service to the console now, so no committed
    call is missed."""
    from ..api import register_error_handlers  # the api package imports this module

    # Once per process, before the blueprint's first registration (the API's error shape).
    if not getattr(metrics_bp, "_headspace_error_handlers", False):
        register_error_handlers(metrics_bp)
        metrics_bp._headspace_error_handlers = True  # type: ignore[attr-defined]
    app.register_blueprint(console_bp)
    app.register_blueprint(metrics_bp)
    if "inference" in app.extensions:
        console_for(app)
