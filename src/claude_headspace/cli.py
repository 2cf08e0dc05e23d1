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


@click.command("infer")
@click.option("--level", required=True, help="turn, task, project or objective")
@click.option("--purpose", required=True, help="What the call is for (stored with it).")
@click.option("--project-id", type=int, default=None)
@click.option("--agent-id", type=int, default=None)
@click.option("--command-id", type=int, default=None)
@click.option("--turn-id", type=int, default=None)
@click.option("--system", "system_prompt", default=None, help="A system prompt.")
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.argument("text")
@with_appcontext
def infer_command(
    level: str,
    purpose: str,
    text: str,
    project_id: int | None,
    agent_id: int | None,
    command_id: int | None,
    turn_id: int | None,
    system_prompt: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> None:
    """Run one inference call on TEXT and print the result as JSON."""
    from .inference.errors import InferenceError, InvalidRequestError

    service = current_app.extensions["inference"]
    try:
        result = service.infer(
            level,
            purpose,
            text,
            project_id=project_id,
            agent_id=agent_id,
            command_id=command_id,
            turn_id=turn_id,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
        )
    except InferenceError as exc:
        click.echo(json.dumps({"error": exc.to_dict()}), err=True)
        service.close()
        sys.exit(2 if isinstance(exc, InvalidRequestError) else 1)
    service.close()
    _echo_json(result.to_dict())


def register_commands(app: Flask) -> None:
    """Install the app's commands on ``app.cli``."""
    app.cli.add_command(db_group)
    app.cli.add_command(infer_command)


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


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="gunicorn processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per process")
@click.option("--timeout", default=60, show_default=True, type=int, help="worker timeout, s")
def serve_command(host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    """Serve the app with gunicorn (each worker builds its own app and service)."""
    from .app import create_app
    from .server import serve

    # Fail here, once, on a bad configuration, rather than in every worker.
    create_app().extensions["inference"].close()
    serve(host, port, workers, threads, timeout)
