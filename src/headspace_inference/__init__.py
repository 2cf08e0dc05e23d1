"""Claude Headspace's inference layer: one service for every call to OpenRouter.

Inside a Flask app: ``Inference`` (the extension). On its own: ``create_app()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # before the imports below: the client reads it

from .db import SERVICE_VERSION_TABLE
from .extension import Inference
from .models import SERVICE_TABLES

__all__ = ["SERVICE_TABLES", "Inference", "create_app", "include_name"]
if TYPE_CHECKING:
    from flask import Flask


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """Build the standalone Flask app (see headspace_inference.app.create_app)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def include_name(name: str | None, type_: str, parent_names: Any = None) -> bool:
    """For a host's Alembic ``include_name``: False for the service's tables and its version
    table, so the host's autogenerate neither creates nor drops them."""
    return not (type_ == "table" and (name in SERVICE_TABLES or name == SERVICE_VERSION_TABLE))
