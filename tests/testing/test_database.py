"""create_tables / drop_tables: the service's tables in a host's create_all test database, on
SQLite and PostgreSQL, and a real service recording its calls into them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    column,
    create_engine,
    insert,
    inspect,
    select,
    table,
    update,
)
from sqlalchemy.pool import NullPool

from headspace_inference import Inference
from headspace_inference.calllog.database import SERVICE_HISTORY, SERVICE_VERSION_TABLE
from headspace_inference.calllog.models import Base, InferenceCall
from headspace_inference.inference.errors import UnknownEntityError
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import normalise_url
from headspace_inference.testing import create_tables, drop_tables
from tests.service_fixtures import KEY

# A host's own schema, as its models would declare it.
host_metadata = MetaData()
projects = Table("projects", host_metadata, Column("id", Integer, primary_key=True),
                 Column("name", String(50)))  # fmt: skip
agents = Table("agents", host_metadata, Column("id", Integer, primary_key=True),
               Column("project_id", ForeignKey("projects.id")))  # fmt: skip
commands = Table("commands", host_metadata, Column("id", Integer, primary_key=True),
                 Column("agent_id", ForeignKey("agents.id")))  # fmt: skip
turns = Table("turns", host_metadata, Column("id", Integer, primary_key=True),
              Column("command_id", ForeignKey("commands.id")))  # fmt: skip
HOST_TABLES = {"projects", "agents", "commands", "turns"}


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty test database (SQLite file, or a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'host.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    yield engine
    engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


# The tables the service makes (SERVICE_TABLES also names the archive of a host table it
# took over, which only an adoption makes).
OWN_TABLES = set(Base.metadata.tables)
VERSIONS = table(SERVICE_VERSION_TABLE, column("version_num"))


def version(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(VERSIONS.c.version_num)))


def test_create_tables_makes_the_services_tables_at_head(engine: Engine) -> None:
    host_metadata.create_all(engine)

    create_tables(engine)

    assert tables(engine) == HOST_TABLES | OWN_TABLES | {SERVICE_VERSION_TABLE}
    assert version(engine) == [SERVICE_HISTORY.head()]
    linked = {
        fk["referred_table"]: fk["options"].get("ondelete")
        for fk in inspect(engine).get_foreign_keys("inference_calls")
    }
    assert linked == dict.fromkeys(HOST_TABLES, "SET NULL")
    # Called again, it keeps what is there.
    create_tables(engine)
    assert version(engine) == [SERVICE_HISTORY.head()]


def test_create_tables_on_a_connection_runs_in_its_transaction(engine: Engine) -> None:
    if engine.dialect.name == "postgresql":
        # (pysqlite runs DDL outside any transaction: there a rollback undoes nothing.)
        with engine.connect() as conn:
            create_tables(conn)
            conn.rollback()
        assert tables(engine) == set()

    with engine.connect() as conn:
        create_tables(conn)
        conn.commit()
    assert tables(engine) == OWN_TABLES | {SERVICE_VERSION_TABLE}


def test_a_database_at_another_revision_is_refused(engine: Engine) -> None:
    create_tables(engine)
    with engine.begin() as conn:
        conn.execute(update(VERSIONS).values(version_num="i0001"))

    with pytest.raises(ValueError, match=r"at i0001, not the service's head .*db upgrade"):
        create_tables(engine)


def test_drop_tables_leaves_the_hosts(engine: Engine) -> None:
    host_metadata.create_all(engine)
    create_tables(engine)

    drop_tables(engine)

    assert tables(engine) == HOST_TABLES
    drop_tables(engine)  # nothing left to drop is fine
    host_metadata.drop_all(engine)
    assert tables(engine) == set()


@pytest.fixture
def host_app(
    engine: Engine, emulator: Any, tmp_path: Path
) -> Iterator[tuple[Flask, InferenceService]]:
    """A host app on ``engine``, its schema made by create_all and create_tables."""
    host_metadata.create_all(engine)
    create_tables(engine)
    with engine.begin() as conn:
        conn.execute(insert(projects).values(id=1, name="p"))
    app = Flask("host", instance_path=str(tmp_path / "instance"))
    overrides = {
        "openrouter": {
            "base_url": emulator.base_url,
            "api_key": KEY,
            "models": dict.fromkeys(["turn", "command", "project", "objective"], "m/x"),
            "pricing_file": str(tmp_path / "prices.json"),
        },
        "inference": {"spool_path": str(tmp_path / "spool")},
    }
    service = Inference().init_app(
        app, engine=engine, overrides=overrides, config_path=tmp_path / "none.yaml"
    )
    yield app, service
    service.close(timeout=5)


def test_a_service_records_its_calls_into_the_tables(
    host_app: tuple[Flask, InferenceService], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _, service = host_app
    caplog.set_level(logging.WARNING)

    result = service.infer(level="command", purpose="summarise", input_text="hi", project_id=1)
    with pytest.raises(UnknownEntityError, match="project_id 2 does not exist"):
        service.infer(level="turn", purpose="summarise", input_text="hi", project_id=2)
    assert service.recorder.flush(timeout=30)

    with engine.connect() as conn:
        rows = conn.execute(
            select(InferenceCall.request_id, InferenceCall.level, InferenceCall.project_id)
        ).all()
    assert [tuple(row) for row in rows] == [(result.call_id, "command", 1)]
    assert not [r for r in caplog.records if "behind" in r.getMessage()]
    assert version(engine) == [SERVICE_HISTORY.head()]
