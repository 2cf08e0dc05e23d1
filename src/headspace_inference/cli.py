"""The service's commands, in one place: ``db``, ``infer``, ``status``, ``usage`` and
``pricing``.

- ``inference_group``: the ``inference`` group the extension puts on every app's CLI
  (``flask --app HOST inference db|status|usage|infer|pricing ...``);
- ``register_commands(app)``: the same commands at the top of the standalone app's CLI
  (``flask --app headspace_inference infer``);
- the ``headspace-inference`` program (standalone/cli.py) puts them beside ``serve`` and
  ``openrouter-emulator``.

What only one command needs is imported inside that command, so ``--help`` and a host's
``flask routes`` load none of it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from .app_state import service_for

if TYPE_CHECKING:
    from .calllog.database import Database
    from .settings import OpenRouterSettings

T = TypeVar("T")


def or_exit(build: Callable[[], T]) -> T:
    """``build()``; on a bad configuration, its one-line message on stderr and exit status 2."""
    from .settings import ConfigError  # loaded by build() anyway: --help does without it

    try:
        return build()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def app_database() -> Database:
    """The current app's database: the host's (the service's history only), or the
    standalone app's (both histories)."""
    database: Database = service_for(current_app).database
    return database


def _revision(database: Database) -> str:
    revisions = database.revisions()
    if len(revisions) == 1:
        return next(iter(revisions.values())) or "base"
    return ", ".join(f"{name} {rev or 'base'}" for name, rev in revisions.items())


def _migrate(database: Database, move: Callable[[str], None], revision: str) -> None:
    try:
        # A database the upgrade cannot take as it is (a host's own inference_calls that
        # cannot be adopted) is a ConfigError: one line saying what to do.
        or_exit(lambda: move(revision))
    except ValueError as exc:  # a revision that is none of the histories'
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"database at {_revision(database)}")


def make_db_group(database: Callable[[], Database] | None = None) -> click.Group:
    """The ``db`` commands: on the app's database (``flask inference db``), or on the one
    ``database()`` builds, with no app at all (``headspace-inference db``: an app would
    start the service)."""
    group = click.Group("db", help="Database migrations.")
    in_app = database is None
    target = app_database if database is None else database

    def command(name: str) -> Callable[[Callable[..., None]], click.Command]:
        def register(f: Callable[..., None]) -> click.Command:
            return group.command(name)(with_appcontext(f) if in_app else f)

        return register

    @command("upgrade")
    @click.argument("revision", default="head")
    def db_upgrade(revision: str) -> None:
        """Apply migrations up to REVISION (default: head)."""
        db = target()
        _migrate(db, db.upgrade, revision)

    @command("downgrade")
    @click.argument("revision")
    def db_downgrade(revision: str) -> None:
        """Revert migrations down to REVISION (e.g. base)."""
        db = target()
        _migrate(db, db.downgrade, revision)

    @command("current")
    def db_current() -> None:
        """Print the revision the database is at."""
        click.echo(_revision(target()))

    return group


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
    from .inference.errors import InferenceError, InvalidRequestError

    service = service_for(current_app)
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
    service = service_for(current_app)
    data = service.status()
    service.close()
    click.echo(_table(_flatten(data)) if table else json.dumps(data, indent=2))


@click.command("usage")
@click.option(
    "--check",
    is_flag=True,
    help="Compare the usage rollup with the call log's rows; exit 1 naming where they differ.",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Make the usage rollup again from the call log's rows (after a direct DELETE).",
)
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
    check: bool,
    rebuild: bool,
) -> None:
    """Print usage and cost (as GET /api/inference/usage, with the same options); or check
    the usage rollup against the rows (--check), or make it again from them (--rebuild)."""
    from werkzeug.datastructures import MultiDict

    if check or rebuild:
        _check_or_rebuild(check, rebuild)
        return

    from .operate.http import BadParameter
    from .operate.routes import parse_usage_query
    from .operate.usage import usage_report

    given = {"since": since, "until": until, "level": level, "model": model,
             "project_id": project_id}  # fmt: skip
    service = service_for(current_app)
    try:
        query = parse_usage_query(
            MultiDict({k: v for k, v in given.items() if v is not None}), service.settings.levels
        )
    except BadParameter as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    with app_database().sessions() as session:
        data = usage_report(session, query)
    service.close()
    click.echo(_table(_flatten(data)) if table else json.dumps(data, indent=2))


def _check_or_rebuild(check: bool, rebuild: bool) -> None:
    from .calllog.rollup import count_calls, rebuild_rollup, rollup_disagreements

    database = app_database()
    if rebuild:
        with database.sessions.begin() as session:
            counted = rebuild_rollup(session)
        click.echo(f"usage rollup rebuilt from {counted} calls")
    if check:
        with database.sessions() as session:
            rows, counted = count_calls(session)
            differ = rollup_disagreements(session)
        if differ:
            click.echo(
                f"error: the usage rollup disagrees with the call log: it counts {counted}"
                f" calls, the log has {rows} rows (rows deleted or changed without"
                " `inference purge`?); run `inference usage --rebuild` to repair it",
                err=True,
            )
            for line in differ:
                click.echo(f"  {line}", err=True)
            sys.exit(1)
        click.echo(f"the usage rollup agrees with the call log ({rows} calls)")


@click.command("purge")
@click.option(
    "--project",
    "project_id",
    type=click.IntRange(min=1),
    default=None,
    help="Delete this project's calls.",
)
@click.option(
    "--before",
    default=None,
    help="Delete the calls before this ISO 8601 date or time (UTC unless given).",
)
@click.option("--all", "all_", is_flag=True, help="Delete every call.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_appcontext
def purge_command(project_id: int | None, before: str | None, all_: bool, yes: bool) -> None:
    """Delete calls from the log (by project, by age, or all), keeping the usage rollup
    equal to the rows. --project and --before combine."""
    from datetime import UTC, datetime

    from sqlalchemy import func, select

    from .calllog.models import InferenceCall
    from .calllog.purge import purge_criteria

    cutoff = None
    if before is not None:
        try:
            cutoff = datetime.fromisoformat(before)
        except ValueError:
            click.echo(f"error: --before: not an ISO 8601 date or time: {before!r:.40}", err=True)
            sys.exit(2)
        cutoff = cutoff.replace(tzinfo=UTC) if cutoff.tzinfo is None else cutoff
    if all_ == (project_id is not None or cutoff is not None):
        click.echo(
            "error: give --project, --before (or both), or --all alone"
            " (nothing is deleted without one)",
            err=True,
        )
        sys.exit(2)
    where = purge_criteria(project_id, cutoff, all_)
    service = service_for(current_app)
    with app_database().sessions() as session:
        count = session.scalar(select(func.count()).select_from(InferenceCall).where(where))
    if not yes and not click.confirm(f"Delete {count} calls from the call log?"):
        click.echo("nothing deleted")
        return
    deleted = service.purge(project_id=project_id, before=cutoff, all=all_)
    service.close()
    click.echo(f"{deleted} calls deleted")


def app_openrouter_settings() -> OpenRouterSettings:
    """The current app's ``openrouter`` settings."""
    settings: OpenRouterSettings = service_for(current_app).settings.openrouter
    return settings


def make_pricing_group(settings: Callable[[], OpenRouterSettings] | None = None) -> click.Group:
    """``pricing sync``: with the app's settings (``flask inference pricing sync``), or with
    what ``settings()`` reads, with no app at all (``headspace-inference pricing sync``)."""
    group = click.Group("pricing", help="Model prices.")
    read = app_openrouter_settings if settings is None else settings

    @click.option(
        "--prune",
        is_flag=True,
        help="Drop the stored prices this answer does not give (by default they are kept).",
    )
    def pricing_sync(prune: bool) -> None:
        """Store the configured models' prices from OpenRouter's /models (openrouter.pricing
        still wins), over those stored before; exit status 1 when OpenRouter cannot be read
        or its answer lists no model (the file is then left as it was), 0 otherwise."""
        _sync_and_report(read(), prune=prune)

    group.command("sync")(with_appcontext(pricing_sync) if settings is None else pricing_sync)
    return group


def _sync_and_report(settings: OpenRouterSettings, *, prune: bool) -> None:
    from .inference.errors import InferenceError
    from .inference.pricing_sync import PricingError, sync

    try:
        report = sync(settings, timeout=settings.timeout_seconds, prune=prune)
    except (InferenceError, PricingError) as exc:
        click.echo(f"error: prices not synced: {exc}", err=True)
        raise SystemExit(1) from None
    for problem in report.problems:
        click.echo(f"warning: no price for {problem}", err=True)
    for kind, models in (
        ("added", report.added),
        ("changed", report.changed),
        ("kept (not priced by this answer; --prune drops them)", report.kept),
        ("removed", report.removed),
    ):
        if models:
            click.echo(f"{kind}: {', '.join(models)}")
    click.echo(
        f"{report.priced} model(s) priced from {settings.base_url}/models into {report.path}"
    )


COMMANDS = (infer_command, status_command, usage_command, purge_command)


@click.group("inference", help="The inference service: its migrations, status, usage, a call.")
def inference_group() -> None:
    """The inference service's commands."""


for _command in (make_db_group(), make_pricing_group(), *COMMANDS):
    inference_group.add_command(_command)


def register_commands(app: Flask) -> None:
    """Install the commands at the top of ``app.cli`` too (the standalone app)."""
    for command in (make_db_group(), *COMMANDS):
        app.cli.add_command(command)
