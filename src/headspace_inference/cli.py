"""The ``headspace-inference`` command: the app's commands (commands.py), and ``serve`` and
``openrouter-emulator``, which run without an app of their own in this process."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import FlaskGroup

from .app import create_app
from .clitools import or_exit
from .commands import db_group
from .config import check_spool_dir, load_env_file, load_settings
from .emulator.cli import emulator_command
from .pricing_sync import pricing_group
from .standalone.database import standalone_database


def _create_app_for_cli() -> Flask:
    return or_exit(create_app)


@click.group(
    cls=FlaskGroup,
    create_app=_create_app_for_cli,
    add_default_commands=False,
    add_version_option=False,
    load_dotenv=False,
)
def main() -> None:
    """Claude Headspace inference service."""


# On the group itself, so `headspace-inference db ...` builds no app: an app would migrate the
# embedded database at start-up (a downgrade would not stay down) and start the service's threads.
main.add_command(db_group)


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
    from .server import serve

    # Fail here, once, on a bad configuration, rather than in every worker. Only the
    # settings: an app would start threads (its health probe), and a fork taken while
    # a thread is half-way through an import leaves the workers a half-imported module.
    load_env_file()
    settings = or_exit(load_settings)
    or_exit(lambda: check_spool_dir(settings.inference.spool_dir()))
    # Migrate once here rather than in N workers at the same moment (no threads involved).
    database = standalone_database(settings.database)
    if database.settings.auto_migrate:
        database.upgrade()
    database.dispose()
    serve(host, port, workers, threads, timeout)


main.add_command(emulator_command)
main.add_command(pricing_group)
