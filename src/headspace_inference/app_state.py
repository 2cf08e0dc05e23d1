"""What the extension keeps for each app it initialised, and how every part of the library
finds an app's service (``service_for``): under the key the host gave ``init_app``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask

if TYPE_CHECKING:
    from .inference.service import InferenceService

# The default key of an app's service in app.extensions; a host may name another.
EXTENSION_KEY = "inference"
# Where the extension keeps what it knows of one app (the key it chose included), under a
# name of its own: every part finds the app's service through it (service_for).
STATE_KEY = "headspace_inference"
DEFAULT_URL_PREFIX = "/api/inference"


class RouteClashError(RuntimeError):
    """A URL rule of the service's is also one of the host's (the same rule and method):
    one of them would be shadowed, so start-up stops, naming both endpoints."""


@dataclass
class AppState:
    """What the extension keeps for one app, as ``app.extensions["headspace_inference"]``."""

    key: str  # the app's service is app.extensions[key]
    url_prefix: str = DEFAULT_URL_PREFIX  # where the JSON API is
    page_path: str | None = None  # the operator page's path, if the host asked for it
    metrics_path: str | None = None  # /metrics' path, if the host asked for it
    # The live feed and metrics (an operate.live.Console), made at start.
    console: Any = None


def app_state(app: Flask) -> AppState:
    """The extension's state for ``app``; RuntimeError if init_app has not run on it."""
    state: AppState | None = app.extensions.get(STATE_KEY)
    if state is None:
        raise RuntimeError(
            f"app {app.name!r} has no inference service: call Inference().init_app(app)"
        )
    return state


def service_for(app: Flask) -> InferenceService:
    """``app``'s service, under whichever key the host gave init_app."""
    service: InferenceService = app.extensions[app_state(app).key]
    return service
