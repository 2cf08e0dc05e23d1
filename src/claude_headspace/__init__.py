"""Claude Headspace's inference layer: one service for every call to OpenRouter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from flask import Flask


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """Build the Flask app (see claude_headspace.app.create_app)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
