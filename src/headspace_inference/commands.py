"""The commands that act on the service and its database: ``db``, ``infer``, ``status`` and
``usage``. The extension puts them in an ``inference`` group on every app's CLI (``flask
--app HOST inference ...``); the standalone app also has them at the top (``flask --app
headspace_inference infer``), and so does the ``headspace-inference`` entry point (cli.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from flask import Flask, current_app, has_app_context
from flask.cli import with_appcontext
from werkzeug.datastructures import MultiDict

from .api.inference import BadParameter, parse_usage_query
from .clitools import or_exit
from .config import load_env_file, load_settings
from .db import Database
from .inference.errors import InferenceError, InvalidRequestError
from .inference.usage import usage_report
from .pricing_sync import make_pricing_group


def _database() -> Database:
    """The app's database inside an app (the host's, with the service's history; or the
    standalone app's, with both); else the standalone one configured (``headspace-inference db``
    builds no app, so it neither migrates at start-up nor starts the service's threads)."""
    if has_app_context():
        database: Database = current_app.extensions["inference"].database
        return database
    from .standalone.database import standalone_database

    load_env_file()
    return or_exit(lambda: standalone_database(load_settings().database))


def _revision(database: Database) -> str:
    revisions = database.revisions()
    if len(revisions) == 1:
        return next(iter(revisions.values())) or "base"
    return ", ".join(f"{name} {rev or 'base'}" for name, rev in revisions.items())


def _migrate(database: Database, move: Callable[[str], None], revision: str) -> None:
    try:
        move(revision)
    except ValueError as exc:  # a revision that is none of the histories'
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"database at {_revision(database)}")


def make_db_group(*, in_app: bool) -> click.Group:
    """The ``db`` commands: on the app's database (``in_app``: ``flask inference db``), or on
    the standalone one configured, building no app (``headspace-inference db``)."""
    group = click.Group("db", help="Database migrations.")

    def command(name: str) -> Callable[[Callable[..., None]], click.Command]:
        def register(f: Callable[..., None]) -> click.Command:
            return group.command(name)(with_appcontext(f) if in_app else f)

        return register

    @command("upgrade")
    @click.argument("revision", default="head")
    def db_upgrade(revision: str) -> None:
        """Apply migrations up to REVISION (default: head)."""
        database = _database()
        _migrate(database, database.upgrade, revision)

    @command("downgrade")
    @click.argument("revision")
    def db_downgrade(revision: str) -> None:
        """Revert migrations down to REVISION (e.g. base)."""
        database = _database()
        _migrate(database, database.downgrade, revision)

    @command("current")
    def db_current() -> None:
        """Print the revision the database is at."""
        click.echo(_revision(_database()))

    return group


db_group = make_db_group(in_app=False)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.command("infer")
@click.option("--level", required=True, help="a level: a key of openrouter.models")
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


def _table(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(data, dict):
        rows: list[tuple[str, str]] = []
        for key, value in data.items():
            rows += _flatten(
                value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"
            )
        return rows
    return [(prefix.rstrip("."), "-" if data is None else str(data))]


@click.command("status")
@click.option("--table", is_flag=True, help="A readable table instead of JSON.")
@with_appcontext
def status_command(table: bool) -> None:
    """Print the service's status (as GET /api/inference/status)."""
    service = current_app.extensions["inference"]
    data = service.status()
    service.close()
    click.echo(_table(_flatten(data)) if table else json.dumps(data, indent=2))


@click.command("usage")
@click.option("--since", default=None, help="ISO 8601 start (inclusive)")
@click.option("--until", default=None, help="ISO 8601 end (exclusive)")
@click.option("--level", default=None)
@click.option("--model", default=None)
@click.option("--project-id", default=None)
@click.option("--table", is_flag=True, help="A readable table instead of JSON.")
@with_appcontext
def usage_command(
    since: str | None,
    until: str | None,
    level: str | None,
    model: str | None,
    project_id: str | None,
    table: bool,
) -> None:
    """Print usage and cost (as GET /api/inference/usage, with the same options)."""
    given = {"since": since, "until": until, "level": level, "model": model,
             "project_id": project_id}  # fmt: skip
    service = current_app.extensions["inference"]
    try:
        query = parse_usage_query(
            MultiDict({k: v for k, v in given.items() if v is not None}), service.settings.levels
        )
    except BadParameter as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    service.close()  # not needed to read usage: stop its threads
    with _database().sessions() as session:
        data = usage_report(session, query)
    click.echo(_table(_flatten(data)) if table else json.dumps(data, indent=2))


COMMANDS = (infer_command, status_command, usage_command)


@click.group("inference", help="The inference service: its migrations, status, usage, a call.")
def inference_group() -> None:
    """The inference service's commands."""


for _command in (make_db_group(in_app=True), make_pricing_group(in_app=True), *COMMANDS):
    inference_group.add_command(_command)


def register_commands(app: Flask) -> None:
    """Install the commands at the top of ``app.cli`` too (the standalone app)."""
    for command in (db_group, *COMMANDS):
        app.cli.add_command(command)
