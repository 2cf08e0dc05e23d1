"""The database a host gives the service, on either PostgreSQL driver: by default the engine
of its Flask-SQLAlchemy (found when first used, whichever of the two was set up first, and
never disposed by the service); otherwise an engine the service builds and gives back
entirely at ``stop()``: 200 apps started and stopped leave no connection open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from tests.drivers import BOTH_DRIVERS

from headspace_inference import Inference
from headspace_inference.calllog.models import InferenceCall, UsageRollup
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import normalise_url

KEY = "sk-or-host-engine-000"


def overrides(emulator: Any, tmp_path: Path, **inference: Any) -> dict[str, Any]:
    return {
        "openrouter": {
            "base_url": emulator.base_url,
            "retry": {"base_delay_seconds": 0, "max_delay_seconds": 0},
            "rate_limits": {"calls_per_minute": 100_000, "tokens_per_minute": 100_000_000},
            "storm_breaker": {"calls": 100_000},  # 200 apps' calls of one purpose, one Redis
            "pricing_file": str(tmp_path / "openrouter-pricing.json"),
        },
        "inference": {"spool_path": str(tmp_path / "spool"), **inference},
    }


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    monkeypatch.setenv("HEADSPACE_CONFIG", str(tmp_path / "no-config.yaml"))
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def services() -> Iterator[list[InferenceService]]:
    made: list[InferenceService] = []
    yield made
    for service in made:
        service.close(timeout=5)


def row_count(url: str) -> tuple[int, int]:
    """The rows in inference_calls and the calls the hourly rollup counts."""
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    with engine.connect() as conn:
        calls = conn.scalar(select(func.count()).select_from(InferenceCall))
        rolled = conn.scalar(
            select(func.coalesce(func.sum(UsageRollup.calls), 0)).where(UsageRollup.span == "hour")
        )
    engine.dispose()
    return int(calls or 0), int(rolled or 0)


def watch_disposal(engine: Engine) -> list[Engine]:
    disposed: list[Engine] = []
    event.listen(engine, "engine_disposed", lambda conn: disposed.append(engine))
    return disposed


@BOTH_DRIVERS
@pytest.mark.parametrize("order", ["flask_sqlalchemy_first", "inference_first"])
def test_calls_land_through_the_host_s_flask_sqlalchemy_engine_by_default(
    migrated_postgres_url: str,
    pg_driver: str,
    order: str,
    emulator: Any,
    tmp_path: Path,
    host_env: None,
    services: list[InferenceService],
) -> None:
    # Claude Headspace: Flask-SQLAlchemy on psycopg2, no engine= given. The writer took
    # psycopg 3's cursor.copy() for granted and spooled every call forever.
    assert make_url(migrated_postgres_url).get_driver_name() == pg_driver
    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = migrated_postgres_url
    db = SQLAlchemy()
    inference = Inference(overrides=overrides(emulator, tmp_path))
    if order == "flask_sqlalchemy_first":
        db.init_app(app)
        service = inference.init_app(app)
    else:
        service = inference.init_app(app)
        db.init_app(app)
    services.append(service)
    with app.app_context():
        host_engine = db.engine
    disposed = watch_disposal(host_engine)
    for i in range(25):
        assert service.infer(level="turn", purpose="host", input_text=f"call {i}").text
    assert service.recorder.flush(timeout=30)
    assert service.database.engine is host_engine
    assert service.recorder.stats()["state"] == "ok"
    assert row_count(migrated_postgres_url) == (25, 25)
    service.close(timeout=5)
    assert disposed == []  # the host's engine is the host's
    with host_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM inference_calls")).scalar() == 25


def test_an_explicit_database_url_wins_over_the_host_s_flask_sqlalchemy(
    migrated_postgres_url: str,
    sqlite_url: str,
    emulator: Any,
    tmp_path: Path,
    host_env: None,
    services: list[InferenceService],
) -> None:
    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = sqlite_url
    db = SQLAlchemy(app)
    options = overrides(emulator, tmp_path, database={"auto_migrate": True})
    service = Inference().init_app(app, database_url=migrated_postgres_url, overrides=options)
    services.append(service)
    assert service.infer(level="turn", purpose="p", input_text="x").text
    assert service.recorder.flush(timeout=30)
    assert service.database.engine.dialect.name == "postgresql"
    with app.app_context():
        assert service.database.engine is not db.engine
    assert row_count(migrated_postgres_url) == (1, 1)


def test_a_host_s_sqlite_engine_keeps_its_own_connect_settings(
    sqlite_url: str, emulator: Any, tmp_path: Path, host_env: None, services: list[InferenceService]
) -> None:
    # The service's own SQLite engines turn on foreign keys and WAL; a host's engine is left
    # as the host made it (its pragmas, if any, are its own).
    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = sqlite_url
    db = SQLAlchemy(app)
    options = overrides(emulator, tmp_path, database={"auto_migrate": True})
    service = Inference().init_app(app, overrides=options)
    services.append(service)
    assert service.infer(level="turn", purpose="p", input_text="x").text
    assert service.recorder.flush(timeout=30)
    with app.app_context():
        assert service.database.engine is db.engine
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
            assert conn.exec_driver_sql("SELECT count(*) FROM inference_calls").scalar() == 1


# --------------------------------------------------------------------------- connections

APPS = 200


def connections_to(admin: Engine, database: str) -> int:
    with admin.connect() as conn:
        count = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": database},
        ).scalar()
    return int(count or 0)


def redis_clients(redis_url: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    try:
        return sum(1 for c in client.client_list() if int(c["db"]) == int(db)) - 1  # not ours
    finally:
        client.close()


@pytest.mark.slow
@BOTH_DRIVERS
def test_two_hundred_apps_started_and_stopped_leave_no_connection_open(
    migrated_postgres_url: str,
    redis_server_url: str,
    redis_prefix: str,
    emulator: Any,
    tmp_path: Path,
    host_env: None,
) -> None:
    # A host's test suite builds an app per test: an engine the library built and did not
    # dispose kept its pooled connections, and PostgreSQL's 100 ran out.
    database = make_url(migrated_postgres_url).database
    assert database is not None
    admin = create_engine(normalise_url(migrated_postgres_url), poolclass=NullPool)
    redis_before = redis_clients(redis_server_url)
    threads_before = threading.active_count()
    redis = {"url": redis_server_url, "key_prefix": redis_prefix}
    options = overrides(emulator, tmp_path, redis=redis)
    # Kept alive, as a host's test session may keep its apps: what stop() does not give
    # back stays open until the garbage collector happens on it.
    apps = []
    for i in range(APPS):
        app = Flask(f"host{i}")
        service = Inference().init_app(app, database_url=migrated_postgres_url, overrides=options)
        assert service.infer(level="turn", purpose="p", input_text=f"app {i}").text
        assert app.test_client().get("/api/inference/status").status_code == 200  # the probe
        service.stop()
        apps.append(app)
    assert row_count(migrated_postgres_url) == (APPS, APPS)
    assert connections_to(admin, database) == 0
    # Others may close theirs meanwhile; none of the 200 services' is left open.
    assert redis_clients(redis_server_url) <= redis_before
    assert threading.active_count() <= threads_before
    admin.dispose()


# --------------------------------------------------------------------------- drivers installed

# A process in which the named modules cannot be imported: a host without them installed.
WITHOUT = "import sys\nfor name in {hidden!r}:\n    sys.modules[name] = None\n"


def run_without(hidden: tuple[str, ...], code: str, **env: str) -> str:
    script = WITHOUT.format(hidden=hidden) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_url_naming_no_driver_uses_psycopg_3_when_installed() -> None:
    # Whatever SQLAlchemy's own default (2.0: psycopg2; 2.1: psycopg 3).
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"


def test_a_host_with_psycopg2_alone_logs_its_calls_through_a_url_naming_no_driver(
    migrated_postgres_url: str, emulator: Any, tmp_path: Path
) -> None:
    # Claude Headspace installs psycopg2-binary, not the postgres extra, and its URL names
    # no driver: on SQLAlchemy 2.1 (postgresql:// read as psycopg 3) nothing could connect.
    plain = make_url(migrated_postgres_url).set(drivername="postgresql")
    code = """
        import json, os
        from flask import Flask
        from headspace_inference import Inference

        app = Flask("host")
        app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["URL"]
        service = Inference().init_app(app, overrides=json.loads(os.environ["OVERRIDES"]))
        service.infer(level="turn", purpose="p", input_text="psycopg2 alone")
        assert service.recorder.flush(timeout=30)
        print(service.database.engine.dialect.driver, service.recorder.stats()["written"])
        service.close()
    """
    out = run_without(
        ("psycopg",),
        code,
        URL=plain.render_as_string(hide_password=False),
        OVERRIDES=json.dumps(overrides(emulator, tmp_path)),
        OPENROUTER_API_KEY=KEY,
        HEADSPACE_CONFIG=str(tmp_path / "no-config.yaml"),
        DATABASE_URL="",
    )
    assert out.splitlines()[-1] == "psycopg2 1"
    assert row_count(migrated_postgres_url) == (1, 1)


def test_the_live_feed_listens_on_a_host_with_psycopg2_alone(migrated_postgres_url: str) -> None:
    # The feed's LISTEN connection comes from the engine's own driver, so a psycopg2 host's
    # /events stream hears every process's calls.
    code = """
        import os, threading
        from sqlalchemy import create_engine
        from headspace_inference.operate.feed import PostgresTransport

        class Database:
            engine = create_engine(os.environ["URL"])

        transport = PostgresTransport(Database())
        listening, heard = threading.Event(), []

        def listen():
            for message in transport.listen(lambda: bool(heard), listening.set):
                heard.append(message)

        thread = threading.Thread(target=listen)
        thread.start()
        assert listening.wait(30)
        transport.publish(["r1,r2"])
        thread.join(30)
        print(Database.engine.dialect.driver, ",".join(heard))
    """
    url = make_url(migrated_postgres_url).set(drivername="postgresql+psycopg2")
    out = run_without(("psycopg",), code, URL=url.render_as_string(hide_password=False))
    assert out.splitlines()[-1] == "psycopg2 r1,r2"


@pytest.mark.parametrize(
    ("hidden", "url", "hint"),
    [
        (
            ("psycopg", "psycopg2"),
            "postgresql://u@h/db",
            "no installed driver for postgresql+psycopg: pip install "
            "'headspace-inference[postgres]' (psycopg 3), or psycopg2-binary",
        ),
        (
            ("psycopg2",),
            "postgresql+psycopg2://u@h/db",
            "no installed driver for postgresql+psycopg2: pip install psycopg2-binary",
        ),
    ],
    ids=["neither", "psycopg2-named"],
)
def test_a_missing_driver_is_named_with_what_to_install(
    hidden: tuple[str, ...], url: str, hint: str
) -> None:
    code = f"""
        from headspace_inference.settings import check_url
        try:
            check_url({url!r})
        except ValueError as exc:
            print(exc)
    """
    assert run_without(hidden, code) == hint
