"""Shared fixtures: real databases (SQLite always, PostgreSQL when TEST_DATABASE_URL is set,
through psycopg 3 or psycopg2: tests/drivers.py), real Redis (when TEST_REDIS_URL is set),
and a fake clock.

PostgreSQL and Redis are never mocked. When their variable is set and the server does not
answer, the test fails rather than skips: CI sets both and must not go green on a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from headspace_inference.clock import FakeClock
from headspace_inference.settings import normalise_url
from tests.drivers import on_driver
from tests.tcp_proxy import TcpProxy

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked slow unless SLOW=1 (``.ci/run`` sets it)."""
    if os.environ.get("SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with SLOW=1 (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def user_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The user state directory (where a spool goes by default) is the test's own: the suite
    writes nothing under the home directory, and no test replays another's spool."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that moves only when slept on or advanced."""
    return FakeClock()


# --------------------------------------------------------------------------- PostgreSQL


class _PostgresServer:
    """Creates throwaway databases on the server TEST_DATABASE_URL points at."""

    def __init__(self, url: str) -> None:
        self.url = make_url(normalise_url(url))
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=1)
        self.template: str | None = None
        self.created: list[str] = []

    def check(self) -> None:
        try:
            with self.admin.connect() as conn:
                conn.execute(text("select 1"))
        except Exception as exc:
            pytest.fail(f"TEST_DATABASE_URL is set but PostgreSQL does not answer: {exc}")

    def create(self, template: str | None = None) -> str:
        name = f"hs_test_{uuid.uuid4().hex[:12]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}{clause}"))
        self.created.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def migrated_template(self) -> str:
        if self.template is None:
            from headspace_inference.settings import DatabaseSettings
            from headspace_inference.standalone.database import standalone_database

            url = self.create()
            db = standalone_database(DatabaseSettings(url=url))
            db.upgrade()
            db.dispose()
            self.template = make_url(url).database
        assert self.template is not None
        return self.template

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in reversed(self.created):
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[_PostgresServer]:
    """The PostgreSQL server of TEST_DATABASE_URL (skip when unset, fail when down)."""
    if not TEST_DATABASE_URL:
        pytest.skip("TEST_DATABASE_URL not set")
    server = _PostgresServer(TEST_DATABASE_URL)
    server.check()
    yield server
    server.drop_all()


@pytest.fixture
def pg_driver() -> str:
    """The driver the PostgreSQL fixtures' URLs name: psycopg 3, unless a test is
    parametrized over ``pg_driver`` (tests/drivers.py: ``BOTH_DRIVERS``)."""
    return "psycopg"


@pytest.fixture
def postgres_url(postgres_server: _PostgresServer, pg_driver: str) -> str:
    """A fresh, empty PostgreSQL database (no tables)."""
    return on_driver(postgres_server.create(), pg_driver)


@pytest.fixture
def migrated_postgres_url(postgres_server: _PostgresServer, pg_driver: str) -> str:
    """A fresh PostgreSQL database with every migration applied."""
    url = postgres_server.create(template=postgres_server.migrated_template())
    return on_driver(url, pg_driver)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file (no tables)."""
    return f"sqlite:///{tmp_path / 'headspace.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with every migration applied, on SQLite and on PostgreSQL (and on
    PostgreSQL through psycopg2 too where a test says ``@EVERY_DATABASE``, tests/drivers.py)."""
    if request.param == "sqlite":
        from headspace_inference.settings import DatabaseSettings
        from headspace_inference.standalone.database import standalone_database

        url = f"sqlite:///{tmp_path / 'headspace.db'}"
        db = standalone_database(DatabaseSettings(url=url))
        db.upgrade()
        db.dispose()
        return url
    server: _PostgresServer = request.getfixturevalue("postgres_server")
    driver = "psycopg2" if request.param == "postgres+psycopg2" else "psycopg"
    return on_driver(server.create(template=server.migrated_template()), driver)


@pytest.fixture
def postgres_proxy(migrated_postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A cuttable TCP proxy in front of a migrated PostgreSQL database, and its URL."""
    url = make_url(normalise_url(migrated_postgres_url))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, proxied
    proxy.close()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """TEST_REDIS_URL (skip when unset, fail when Redis does not answer)."""
    if not TEST_REDIS_URL:
        pytest.skip("TEST_REDIS_URL not set")
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"TEST_REDIS_URL is set but Redis does not answer: {exc}")
    finally:
        client.close()
    return TEST_REDIS_URL


@pytest.fixture
def redis_prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"hs-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_server_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_proxy(redis_server_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test Redis, to cut and restore it."""
    import redis

    target = redis.connection.parse_url(redis_server_url)
    with TcpProxy(target.get("host", "127.0.0.1"), int(target.get("port", 6379))) as proxy:
        yield proxy


def redis_url_through(proxy: TcpProxy, redis_server_url: str) -> str:
    """The test Redis's URL (its database number kept) through ``proxy``."""
    import redis

    db = redis.connection.parse_url(redis_server_url).get("db", 0)
    return proxy.url("redis", f"/{db}")


# --------------------------------------------------------------------------- OpenRouter emulator


@pytest.fixture(scope="session")
def _emulator_server() -> Iterator[object]:
    from headspace_inference.testing.emulator import EmulatorServer

    server = EmulatorServer().start()
    yield server
    server.stop()


@pytest.fixture
def emulator(_emulator_server: object) -> object:
    """The local OpenRouter emulator on a loopback port, reset for this test."""
    _emulator_server.reset()  # type: ignore[attr-defined]
    return _emulator_server


pytest_plugins = ["tests.emulator_fixtures", "tests.service_fixtures", "tests.served"]
