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
    from .api.inference import status_without_service

    service = current_app.extensions.get("inference")
    if service is None:
        data = status_without_service(current_app.extensions["headspace.settings"])
    else:
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
    from werkzeug.datastructures import MultiDict

    from .api.inference import BadParameter, parse_usage_query
    from .inference.usage import usage_report

    given = {"since": since, "until": until, "level": level, "model": model,
             "project_id": project_id}  # fmt: skip
    try:
        query = parse_usage_query(MultiDict({k: v for k, v in given.items() if v is not None}))
    except BadParameter as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    service = current_app.extensions.get("inference")
    if service is not None:
        service.close()  # not needed to read usage: stop its threads now
    with _database().sessions() as session:
        data = usage_report(session, query)
    click.echo(_table(_flatten(data)) if table else json.dumps(data, indent=2))


def register_commands(app: Flask) -> None:
    """Install the app's commands on ``app.cli``."""
    app.cli.add_command(db_group)
    app.cli.add_command(infer_command)
    app.cli.add_command(status_command)
    app.cli.add_command(usage_command)


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


# Not in an app context: FlaskGroup would otherwise build the app, with its threads, in
# the gunicorn master, and every worker forked from it would inherit that app.
@main.command("serve", with_appcontext=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="gunicorn processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per process")
@click.option("--timeout", default=60, show_default=True, type=int, help="worker timeout, s")
def serve_command(host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    """Serve the app with gunicorn (each worker builds its own app and service)."""
    from .app import load_env_file
    from .config import check_spool_dir, load_settings
    from .db import Database
    from .server import serve

    # Fail here, once, on a bad configuration, rather than in every worker. Only the
    # settings: an app would start threads (its health probe), and a fork taken while
    # a thread is half-way through an import leaves the workers a half-imported module.
    load_env_file()
    try:
        settings = load_settings()
        check_spool_dir(settings.inference.spool_path or "instance/call-log")  # create_app's
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    # Migrate once here rather than in N workers at the same moment (no threads involved).
    database = Database(settings.database)
    if database.is_sqlite or settings.database.auto_migrate:
        database.upgrade()
    database.dispose()
    serve(host, port, workers, threads, timeout)


@click.command("openrouter-emulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=int, help="0 picks a free port")
@click.option("--latency-ms", default=0, show_default=True, type=int, help="per chat answer")
@click.option("--accept-key", multiple=True, help="A key to accept (default: any sk-or-...).")
@click.option("--fault", multiple=True, help='A scripted fault as JSON, e.g. {"status": 429}.')
@click.option("--chaos", type=int, default=None, help="Seed for random faults.")
@click.option("--chaos-mix", default=None, help="outcome=weight,... e.g. ok=0.8,429=0.1,drop=0.1")
@click.option("--chaos-hang-ms", default=3000, show_default=True, type=int)
def emulator_command(
    host: str,
    port: int,
    latency_ms: int,
    accept_key: tuple[str, ...],
    fault: tuple[str, ...],
    chaos: int | None,
    chaos_mix: str | None,
    chaos_hang_ms: int,
) -> None:
    """Run the local OpenRouter emulator in the foreground; prints its URL first."""
    # Needs neither the app nor a database, so it is registered on the group itself.
    from .emulator.cli import build, serve

    try:
        server = build(host=host, port=port, latency_ms=latency_ms, accept_keys=accept_key,
                       faults=fault, chaos=chaos, chaos_mix=chaos_mix,
                       chaos_hang_ms=chaos_hang_ms)  # fmt: skip
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    serve(server)


main.add_command(emulator_command)
