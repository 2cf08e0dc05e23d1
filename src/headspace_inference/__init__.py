"""Claude Headspace's inference layer: one service for every call to OpenRouter.

Inside a Flask app: ``Inference`` (the extension). On its own: ``create_app()``. Importing
the package loads the extension, the errors and the result types; everything else (the
service, the database layer, the optional extras) loads when it is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .app_state import RouteClashError
from .extension import Inference
from .inference.errors import BudgetExceededError, InferenceError, InvalidRequestError
from .inference.types import InferenceResult

if TYPE_CHECKING:
    from flask import Flask

    from .calllog.database import include_name
    from .calllog.models import SERVICE_TABLES
    from .inference.service import InferenceService

__all__ = [
    "SERVICE_TABLES",
    "BudgetExceededError",
    "Inference",
    "InferenceError",
    "InferenceResult",
    "InferenceService",
    "InvalidRequestError",
    "RouteClashError",
    "__version__",
    "create_app",
    "include_name",
]

# Public names whose modules load on first use (PEP 562).
_LAZY = {
    "InferenceService": "headspace_inference.inference.service",
    "SERVICE_TABLES": "headspace_inference.calllog.models",
    "include_name": "headspace_inference.calllog.database",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """Build the standalone Flask app (see headspace_inference.standalone.app.create_app)."""
    from .standalone.app import create_app as _create_app

    return _create_app(*args, **kwargs)
