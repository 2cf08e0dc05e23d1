"""The ``headspace`` command line (a Flask CLI group)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from .config import ConfigError


def _database() -> Any:
    return current_app.extensions["headspace.database"]


@click.group("db", help="Database migrations.")
def db_group() -> None:
    """Database migrations."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@with_appcontext
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from .db import upgrade

    upgrade(_database().engine, revision)
    click.echo(f"database at {_current()}")


@db_group.command("downgrade")
@click.argument("revision")
@with_appcontext
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (e.g. base)."""
    from .db import downgrade

    downgrade(_database().engine, revision)
    click.echo(f"database at {_current()}")


@db_group.command("current")
@with_appcontext
def db_current() -> None:
    """Print the revision the database is at."""
    click.echo(_current())


def _current() -> str:
    from .db import current_revision

    return current_revision(_database().engine) or "base"


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def register_commands(app: Flask) -> None:
    """Install the app's commands on ``app.cli``."""
    app.cli.add_command(db_group)


def _create_app_for_cli() -> Flask:
    from .app import create_app

    try:
        return create_app()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@click.group(
    cls=FlaskGroup,
    create_app=_create_app_for_cli,
    add_default_commands=False,
    add_version_option=False,
    load_dotenv=False,
)
def main() -> None:
    """Claude Headspace inference service."""
