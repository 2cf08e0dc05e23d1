"""A library does nothing until asked. ``init_app`` validates and registers: no thread, file,
connection, migration, network request or exit hook until the first call, the first request
to one of the service's routes, or ``service.start()``; ``close()`` gives all of it back. A
host's ``flask routes`` and the ``headspace-inference --help`` of a new user write nothing.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.cli import FlaskGroup
from sqlalchemy import create_engine, text

from headspace_inference import Inference
from headspace_inference.settings import normalise_url
from headspace_inference.testing.emulator import REQUEST_THREAD

KEY = "sk-or-lazy-key-0000"


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    for name in ("DATABASE_URL", "REDIS_URL", "HEADSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def root(tmp_path: Path, host_env: None) -> Path:
    """The host's project directory: its instance folder and its config file live here."""
    return tmp_path / "host"


class ExitHooks:
    """The exit hooks the library holds registered (modules imported on the way register
    their own, which are not the library's to give back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: list[Any] = []
        register, unregister = atexit.register, atexit.unregister

        def counted_register(hook: Any, *args: Any, **kwargs: Any) -> Any:
            if hook.__module__.startswith("headspace_inference"):
                self.live.append(hook)
            return register(hook, *args, **kwargs)

        def counted_unregister(hook: Any) -> None:
            if hook in self.live:
                self.live.remove(hook)
            unregister(hook)

        monkeypatch.setattr(atexit, "register", counted_register)
        monkeypatch.setattr(atexit, "unregister", counted_unregister)

    def __len__(self) -> int:
        return len(self.live)


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> ExitHooks:
    return ExitHooks(monkeypatch)


def files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def threads() -> set[str]:
    """The threads running, but the emulator's connection threads (not the service's)."""
    return {t.name for t in threading.enumerate()} - {REQUEST_THREAD}


@pytest.fixture
def made() -> Iterator[list[Flask]]:
    apps: list[Flask] = []
    yield apps
    for app in apps:
        app.extensions["inference"].close(timeout=5)


def host(made: list[Flask], root: Path, url: str, emulator: Any, **options: Any) -> Flask:
    root.mkdir(exist_ok=True)
    app = Flask("host", instance_path=str(root / "instance"), root_path=str(root))
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    overrides = {"openrouter": {"base_url": emulator.base_url}}
    Inference(app, overrides=overrides, **options)
    made.append(app)
    return app


def test_init_app_starts_nothing_and_the_first_call_starts_it(
    made: list[Flask], root: Path, emulator: Any, hooks: ExitHooks, user_state_dir: Path
) -> None:
    before = threads()
    app = host(made, root, f"sqlite:///{root / 'host.db'}", emulator)
    service = app.extensions["inference"]
    assert not service.started
    assert threads() - before == set()
    assert files(root) == []  # no database file, no instance/, no spool
    assert len(hooks) == 0
    assert emulator.requests == []  # no probe of OpenRouter

    service.database.upgrade()  # what `flask inference db upgrade` does
    result = service.infer("turn", "summarise", "the first call starts the service")
    assert service.started
    assert result.text
    assert "call-log-writer" in threads()
    # The spool: in the user state directory, outside the app's tree.
    assert service.recorder.spool_dir.is_dir()
    assert service.recorder.spool_dir.is_relative_to(user_state_dir)
    assert len(hooks) == 2  # close the service, then drain its feed, at exit

    service.close(timeout=5)
    assert "call-log-writer" not in threads()
    assert len(hooks) == 0
    assert not service.started


def test_the_first_request_to_a_route_starts_it(
    made: list[Flask], root: Path, emulator: Any
) -> None:
    app = host(made, root, f"sqlite:///{root / 'host.db'}", emulator)
    service = app.extensions["inference"]
    assert not service.started
    answer = app.test_client().get("/api/inference/status")
    assert answer.status_code == 200
    assert service.started


def test_start_is_idempotent_and_a_closed_service_stays_closed(
    made: list[Flask], root: Path, emulator: Any, hooks: ExitHooks
) -> None:
    app = host(made, root, f"sqlite:///{root / 'host.db'}", emulator)
    service = app.extensions["inference"]
    assert service.start() is service
    service.start()
    writers = [t for t in threading.enumerate() if t.name == "call-log-writer"]
    assert len(writers) == 1
    assert len(hooks) == 2
    service.close(timeout=5)
    service.start()
    assert not service.started
    assert len(hooks) == 0


def test_a_host_s_flask_routes_writes_and_starts_nothing(
    made: list[Flask], root: Path, emulator: Any
) -> None:
    before = threads()
    app = host(made, root, f"sqlite:///{root / 'host.db'}", emulator)
    # The host's own `flask` command, with Flask's default commands.
    out = CliRunner().invoke(FlaskGroup(create_app=lambda: app), ["routes"])
    assert out.exit_code == 0, out.output
    assert "/api/inference/status" in out.output
    assert files(root) == []
    assert threads() - before == set()
    assert not app.extensions["inference"].started


@pytest.mark.postgres
def test_close_gives_back_the_connections_of_the_engine_it_built(
    made: list[Flask], root: Path, emulator: Any, postgres_url: str
) -> None:
    def connections() -> int:
        watcher = create_engine(normalise_url(postgres_url), poolclass=None)
        try:
            with watcher.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).scalar_one()
                )
        finally:
            watcher.dispose()

    app = host(made, root, postgres_url, emulator)
    service = app.extensions["inference"]
    assert connections() == 0  # init_app connects to nothing
    service.database.upgrade()
    service.infer("turn", "summarise", "hold a connection")
    service.recorder.flush(10)
    assert connections() >= 1
    service.close(timeout=5)
    assert connections() == 0


def test_an_unknown_option_is_refused_naming_it_and_the_one_meant(
    made: list[Flask], root: Path, emulator: Any
) -> None:
    app = Flask("host")
    with pytest.raises(TypeError) as caught:
        Inference().init_app(app, databse_url="sqlite://", bogus=1)  # type: ignore[call-arg]
    message = str(caught.value)
    assert "'databse_url' (did you mean 'database_url'?)" in message
    assert "'bogus'" in message
    assert "inference" not in app.extensions
    with pytest.raises(TypeError, match="'engin' \\(did you mean 'engine'\\?\\)"):
        Inference(engin=None)  # type: ignore[call-arg]


def test_the_command_s_help_writes_nothing(tmp_path: Path) -> None:
    command = Path(sys.executable).with_name("headspace-inference")
    done = subprocess.run(
        [str(command), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("infer", "status", "usage", "db", "pricing", "serve", "openrouter-emulator"):
        assert f"  {name} " in done.stdout
    assert files(tmp_path) == []
