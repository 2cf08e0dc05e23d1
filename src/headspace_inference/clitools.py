"""What every command shares: a bad configuration ends it with one line and status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click

from .config import ConfigError

T = TypeVar("T")


def or_exit(build: Callable[[], T]) -> T:
    """``build()``; on a bad configuration, its one-line message on stderr and exit status 2."""
    try:
        return build()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
