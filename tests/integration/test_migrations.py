"""Migrations, checked by inspecting the database they produce (SQLite and PostgreSQL).

Two histories: the service's (its own tables only, in alembic_version_inference) and the
standalone app's domain tables (in alembic_version). Inside a host only the service's runs.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, inspect, select, text
from tests.drivers import on_driver

from headspace_inference.calllog.database import SERVICE_HISTORY, Database, History
from headspace_inference.calllog.models import Base, UsageRollup
from headspace_inference.settings import DatabaseSettings
from headspace_inference.standalone import models as standalone_models
from headspace_inference.standalone.database import APP_HISTORY, standalone_database

INFERENCE_CALL_COLUMNS = {
    "id",
    "timestamp",
    "level",
    "purpose",
    "model",
    "input_tokens",
    "output_tokens",
    "input_hash",
    "result_text",
    "latency_ms",
    "cost_usd",
    "error_message",
    "cached",
    "project_id",
    "agent_id",
    "command_id",
    "turn_id",
    "request_id",
    "upstream_cost_usd",
}
DOMAIN_TABLES = {"projects", "agents", "commands", "turns", "objectives"}
SERVICE_TABLES = {"inference_calls", "inference_usage_rollup", "inference_budget_use"}
LINKS = [
    ("project_id", "projects"),
    ("agent_id", "agents"),
    ("command_id", "commands"),
    ("turn_id", "turns"),
]
# The history the service had before it kept its own (kept here to prove its databases are
# adopted): 0001 made every table, 0002 converted the SQLite rollup's money.
COMBINED_HISTORY = History(
    "combined", Path(__file__).parents[1] / "legacy_migrations", "alembic_version", MetaData()
)


@pytest.fixture(params=["sqlite", "postgres", "postgres+psycopg2"])
def empty_db(request: pytest.FixtureRequest) -> Database:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    if request.param == "postgres+psycopg2":
        url = on_driver(url, "psycopg2")
    db = standalone_database(DatabaseSettings(url=url))
    request.addfinalizer(db.dispose)
    return db


def indexed_columns(db: Database, table: str) -> set[tuple[str, ...]]:
    return {tuple(ix["column_names"]) for ix in inspect(db.engine).get_indexes(table)}


def test_upgrade_creates_every_table_column_and_index(empty_db: Database) -> None:
    assert empty_db.revisions() == {"app": None, "inference": None}
    empty_db.upgrade()
    assert empty_db.revisions() == {"app": APP_HISTORY.head(), "inference": SERVICE_HISTORY.head()}
    assert empty_db.behind() == []
    inspector = inspect(empty_db.engine)
    tables = set(inspector.get_table_names())
    assert tables == DOMAIN_TABLES | SERVICE_TABLES | {
        "alembic_version",
        "alembic_version_inference",
    }
    columns = {c["name"] for c in inspector.get_columns("inference_calls")}
    assert columns >= INFERENCE_CALL_COLUMNS
    indexes = indexed_columns(empty_db, "inference_calls")
    for wanted in [
        ("timestamp",),
        ("level",),
        ("project_id",),
        ("input_hash",),
        ("level", "timestamp"),
        ("project_id", "timestamp"),
    ]:
        assert wanted in indexes, f"no index on inference_calls{wanted}"
    unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("inference_calls")}
    assert ("request_id",) in unique
    fks = {fk["constrained_columns"][0]: fk for fk in inspector.get_foreign_keys("inference_calls")}
    for column, table in LINKS:
        assert fks[column]["referred_table"] == table
        assert fks[column]["options"].get("ondelete") == "SET NULL"
    agents_fk = inspector.get_foreign_keys("agents")[0]
    assert agents_fk["referred_table"] == "projects"


def test_downgrade_to_base_and_upgrade_again(empty_db: Database) -> None:
    empty_db.upgrade()
    empty_db.downgrade("base")
    assert empty_db.revisions() == {"app": None, "inference": None}
    remaining = set(inspect(empty_db.engine).get_table_names())
    assert remaining == {"alembic_version", "alembic_version_inference"}
    empty_db.upgrade()
    assert "inference_calls" in inspect(empty_db.engine).get_table_names()
    # One history at a time, by its revision: the service's alone leaves the app's tables.
    empty_db.downgrade("base")
    empty_db.upgrade("a0001")
    assert empty_db.revisions() == {"app": "a0001", "inference": None}
    with pytest.raises(ValueError, match="revision 'zz9' is not one of the histories app"):
        empty_db.downgrade("zz9")


def _diff(engine: Engine, metadata: MetaData) -> list[Any]:
    def own(name: str | None, type_: str, parent_names: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    with engine.connect() as conn:
        opts = {"compare_type": True, "include_name": own}
        diff: list[Any] = compare_metadata(MigrationContext.configure(conn, opts=opts), metadata)
    # The link constraints are the database's, not the model's (calllog/link_keys.py).
    return [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_fk")]


def test_models_and_migrations_agree(empty_db: Database) -> None:
    empty_db.upgrade()
    assert _diff(empty_db.engine, Base.metadata) == []
    assert _diff(empty_db.engine, standalone_models.Base.metadata) == []


def test_deleting_a_project_keeps_its_call_log(empty_db: Database) -> None:
    empty_db.upgrade()
    with empty_db.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', :t)"),
            {"t": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO inference_calls (request_id, timestamp, level, purpose, model,"
                " status, input_tokens, output_tokens, input_hash, latency_ms, cached, attempts,"
                " project_id)"
                " VALUES ('r1', :t, 'turn', 'p', 'm', 'ok', 1, 1, 'h', 1, false, 1, 1)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
    with empty_db.engine.begin() as conn:
        conn.execute(text("DELETE FROM projects WHERE id = 1"))
    with empty_db.engine.connect() as conn:
        row = conn.execute(text("SELECT project_id FROM inference_calls")).one()
    assert row.project_id is None


def test_sqlite_enforces_foreign_keys_and_uses_wal(sqlite_url: str) -> None:
    db = standalone_database(DatabaseSettings(url=sqlite_url))
    db.upgrade()
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with pytest.raises(Exception, match="FOREIGN KEY"), db.engine.begin() as conn:
        conn.execute(text("INSERT INTO agents (project_id, created_at) VALUES (999, '2026-01-01')"))
    db.dispose()


def _schema(engine: Engine, table: str) -> dict[str, Any]:
    inspector = inspect(engine)
    return {
        "columns": [
            (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)
        ],
        "indexes": sorted(
            (i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)
        ),
        "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
        "fks": sorted(
            (
                f["name"],
                tuple(f["constrained_columns"]),
                f["referred_table"],
                f["options"].get("ondelete"),
            )
            for f in inspector.get_foreign_keys(table)
        ),
    }


def test_the_service_s_history_alone_makes_only_its_own_tables(empty_db: Database) -> None:
    service_only = Database(empty_db.settings, engine=empty_db.engine)
    service_only.upgrade()
    assert service_only.revisions() == {"inference": SERVICE_HISTORY.head()}
    inspector = inspect(empty_db.engine)
    assert set(inspector.get_table_names()) == SERVICE_TABLES | {"alembic_version_inference"}
    # No linked table exists, so no constraint: a host with no turns table is a host too.
    assert inspector.get_foreign_keys("inference_calls") == []
    assert _diff(empty_db.engine, Base.metadata) == []
    service_only.downgrade("base")
    assert set(inspect(empty_db.engine).get_table_names()) == {"alembic_version_inference"}


def test_linked_tables_made_after_the_service_s_migration_are_linked_by_the_next_upgrade(
    empty_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    service_only = Database(empty_db.settings, engine=empty_db.engine)
    service_only.upgrade()
    with empty_db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(text("INSERT INTO projects (id, name) VALUES (1, 'p')"))
        for request_id, project in (("r1", 1), ("r2", 7)):  # 7: a row the host never had
            conn.execute(
                text(
                    "INSERT INTO inference_calls (request_id, timestamp, level, purpose, model,"
                    " status, input_tokens, output_tokens, input_hash, latency_ms, cached,"
                    " attempts, project_id) VALUES"
                    " (:r, '2026-01-01 00:00:00', 'turn', 'p', 'm', 'ok', 1, 1, 'h', 1, false,"
                    " 1, :p)"
                ),
                {"r": request_id, "p": project},
            )
    with caplog.at_level("WARNING", logger="headspace_inference.calllog.link_keys"):
        service_only.upgrade()  # already at head: only the links are looked at
    assert "1 rows linked to project_id ids missing from projects" in caplog.text
    fks = _schema(empty_db.engine, "inference_calls")["fks"]
    assert fks == [
        ("hinf_fk_inference_calls_project_id_projects", ("project_id",), "projects", "SET NULL")
    ]
    with empty_db.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT request_id, project_id FROM inference_calls")).all())
    assert rows == {"r1": 1, "r2": None}
    # Every index and constraint survived (SQLite rebuilds the table to add one).
    assert _diff(empty_db.engine, Base.metadata) == []
    service_only.upgrade()  # nothing more to do, and nothing done twice
    assert len(_schema(empty_db.engine, "inference_calls")["fks"]) == 1


@pytest.mark.parametrize("combined_at", ["0001", "0002"])
def test_a_database_of_the_combined_history_is_adopted_unchanged(
    empty_db: Database, combined_at: str, tmp_path: Path
) -> None:
    COMBINED_HISTORY.upgrade(empty_db.engine, combined_at)
    with empty_db.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', '2026-01-01')")
        )
        conn.execute(
            text(
                "INSERT INTO inference_usage_rollup (span, bucket_start, level, model,"
                " project_key, calls, cached_calls, error_calls, input_tokens, output_tokens,"
                " cost_usd, saved_cost_usd, upstream_cost_usd, latency_ms_sum,"
                " lat_00, lat_01, lat_02, lat_03, lat_04, lat_05, lat_06, lat_07, lat_08,"
                " lat_09, lat_10, lat_11, lat_12, lat_13)"
                " VALUES ('hour', '2026-11-01 00:00:00.000000', 'turn', 'm', 1, 1, 0, 0,"
                " 1, 1, :cost, 0, :upstream, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)"
            ),
            # What each revision stored: 0002 keeps SQLite money as picodollars.
            {
                "cost": 123456789
                if combined_at == "0002" and empty_db.is_sqlite
                else 0.000123456789,
                "upstream": 500000000000 if combined_at == "0002" and empty_db.is_sqlite else 0.5,
            },
        )
    empty_db.upgrade()
    assert empty_db.revisions() == {"app": "a0001", "inference": SERVICE_HISTORY.head()}
    with empty_db.sessions() as session:
        row = session.scalars(select(UsageRollup)).one()
        assert (row.cost_usd, row.upstream_cost_usd) == (Decimal("0.000123456789"), Decimal("0.5"))
        assert session.scalar(text("SELECT name FROM projects")) == "p"
    # The same tables a fresh database gets.
    fresh = standalone_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'fresh.db'}"))
    fresh.upgrade()
    if empty_db.is_sqlite:
        for table in sorted(DOMAIN_TABLES | SERVICE_TABLES):
            assert _schema(empty_db.engine, table) == _schema(fresh.engine, table), table
    fresh.dispose()
    assert _diff(empty_db.engine, Base.metadata) == []
    assert _diff(empty_db.engine, standalone_models.Base.metadata) == []
    empty_db.downgrade("base")  # and the adopted database goes down both histories
    assert set(inspect(empty_db.engine).get_table_names()) == {
        "alembic_version",
        "alembic_version_inference",
    }


def test_i0002_keeps_existing_rows_with_zero_token_details(empty_db: Database) -> None:
    empty_db.upgrade("i0001")
    with empty_db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO inference_calls (request_id, timestamp, level, purpose, model,"
                " status, input_tokens, output_tokens, input_hash, latency_ms, cached, attempts)"
                " VALUES ('r1', :t, 'turn', 'p', 'm', 'ok', 3, 2, 'h', 1, false, 1)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
    empty_db.upgrade()
    with empty_db.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT model, requested_model, cached_input_tokens, cache_write_tokens,"
                " reasoning_tokens, cache_discount_usd FROM inference_calls"
            )
        ).one()
    assert tuple(row) == ("m", None, 0, 0, 0, None)
    empty_db.downgrade("i0001")
    columns = {c["name"] for c in inspect(empty_db.engine).get_columns("inference_calls")}
    assert "requested_model" not in columns and "reasoning_tokens" not in columns


def test_i0003_gives_an_existing_install_the_service_s_own_names(empty_db: Database) -> None:
    service_only = Database(empty_db.settings, engine=empty_db.engine)
    service_only.upgrade("i0002")
    old = _schema(empty_db.engine, "inference_calls")["indexes"]
    assert ("ix_inference_calls_level", ("level",)) in old
    service_only.upgrade()
    for table in SERVICE_TABLES:
        names = [name for name, _ in _schema(empty_db.engine, table)["indexes"]]
        names.append(inspect(empty_db.engine).get_pk_constraint(table)["name"])
        assert names and all(name.startswith("hinf_") for name in names), names
    assert _diff(empty_db.engine, Base.metadata) == []
    if not empty_db.is_sqlite:
        with empty_db.engine.connect() as conn:
            sequence = conn.scalar(text("SELECT pg_get_serial_sequence('inference_calls', 'id')"))
        assert sequence == "public.hinf_inference_calls_id_seq"
    service_only.downgrade("i0002")
    assert _schema(empty_db.engine, "inference_calls")["indexes"] == old
