"""The ``headspace-inference`` program: the service's commands (cli.py) on the standalone
app, beside ``serve`` and ``openrouter-emulator``.

No command builds the app until it runs: ``--help`` lists them all without one, ``db`` and
``pricing`` work on the configuration alone (an app would start the service), and
``serve`` builds one app per gunicorn worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from flask import Flask
from flask.cli import ScriptInfo

from .._version import __version__
from ..cli import COMMANDS, make_db_group, make_pricing_group, or_exit

if TYPE_CHECKING:
    from ..calllog.database import Database
    from ..settings import OpenRouterSettings, Settings


def _create_app() -> Flask:
    from .app import create_app

    return or_exit(create_app)


def _configured() -> Settings:
    """The standalone configuration (.env, the file, the environment), or exit status 2."""
    from ..config_loading import load_env_file, load_settings

    load_env_file()
    return or_exit(load_settings)


def _configured_database() -> Database:
    from .database import standalone_database

    settings = _configured()
    return or_exit(lambda: standalone_database(settings.database))


def _configured_openrouter() -> OpenRouterSettings:
    return _configured().openrouter


@click.group()
@click.version_option(__version__, prog_name="headspace-inference")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Claude Headspace inference service."""
    # What flask.cli.with_appcontext builds the app from, for the commands that need one.
    ctx.obj = ScriptInfo(create_app=_create_app, set_debug_flag=False)


for _command in (
    *COMMANDS,
    make_db_group(_configured_database),
    make_pricing_group(_configured_openrouter),
):
    main.add_command(_command)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="gunicorn processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per process")
@click.option("--timeout", default=60, show_default=True, type=int, help="worker timeout, s")
def serve_command(host: str, port: int, workers: int, threads: int, timeout: int) -> None:
    """Serve the app with gunicorn (each worker builds its own app and service)."""
    try:
        from .server import serve
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("gunicorn"):
            raise
        raise click.ClickException(
            "serve needs the server extra: pip install 'headspace-inference[server]'"
        ) from None

    from ..calllog.journal import check_spool_dir
    from .database import standalone_database

    # Fail here, once, on a bad configuration, rather than in every worker. Only the
    # settings: an app would start threads (its health probe), and a fork taken while
    # a thread is half-way through an import leaves the workers a half-imported module.
    settings = _configured()
    or_exit(lambda: check_spool_dir(settings.spool_dir()))
    # Migrate once here rather than in N workers at the same moment (no threads involved).
    database = or_exit(lambda: standalone_database(settings.database))
    if database.settings.auto_migrate:
        database.upgrade()
    database.dispose()
    serve(host, port, workers, threads, timeout)


@main.command(
    "openrouter-emulator",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def emulator_command(ctx: click.Context) -> None:
    """Run the local OpenRouter emulator (--help for its options)."""
    from ..testing.emulator.cli import emulator_command

    emulator_command.main(ctx.args, prog_name=ctx.command_path, standalone_mode=True)
