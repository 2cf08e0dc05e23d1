"""Migrations, checked by inspecting the database they produce (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from claude_headspace.config import DatabaseSettings
from claude_headspace.db import Database, current_revision, head_revision
from claude_headspace.models import Base

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


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest) -> Database:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    db = Database(DatabaseSettings(url=url))
    request.addfinalizer(db.dispose)
    return db


def indexed_columns(db: Database, table: str) -> set[tuple[str, ...]]:
    return {tuple(ix["column_names"]) for ix in inspect(db.engine).get_indexes(table)}


def test_upgrade_creates_every_table_column_and_index(empty_db: Database) -> None:
    assert current_revision(empty_db.engine) is None
    empty_db.upgrade()
    assert current_revision(empty_db.engine) == head_revision()
    inspector = inspect(empty_db.engine)
    tables = set(inspector.get_table_names())
    assert DOMAIN_TABLES | {"inference_calls", "inference_usage_rollup"} <= tables
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
    for column, table in [
        ("project_id", "projects"),
        ("agent_id", "agents"),
        ("command_id", "commands"),
        ("turn_id", "turns"),
    ]:
        assert fks[column]["referred_table"] == table
        assert fks[column]["options"].get("ondelete") == "SET NULL"
    agents_fk = inspector.get_foreign_keys("agents")[0]
    assert agents_fk["referred_table"] == "projects"


def test_downgrade_to_base_and_upgrade_again(empty_db: Database) -> None:
    empty_db.upgrade()
    from claude_headspace.db import downgrade

    downgrade(empty_db.engine, "base")
    assert current_revision(empty_db.engine) is None
    remaining = set(inspect(empty_db.engine).get_table_names()) - {"alembic_version"}
    assert remaining == set()
    empty_db.upgrade()
    assert "inference_calls" in inspect(empty_db.engine).get_table_names()


def test_models_and_migrations_agree(empty_db: Database) -> None:
    empty_db.upgrade()
    with empty_db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


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
    db = Database(DatabaseSettings(url=sqlite_url))
    db.upgrade()
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with pytest.raises(Exception, match="FOREIGN KEY"), db.engine.begin() as conn:
        conn.execute(text("INSERT INTO agents (project_id, created_at) VALUES (999, '2026-01-01')"))
    db.dispose()


def test_0003_keeps_existing_rows_with_zero_token_details(empty_db: Database) -> None:
    empty_db.upgrade("0002")
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
    from claude_headspace.db import downgrade

    downgrade(empty_db.engine, "0002")
    columns = {c["name"] for c in inspect(empty_db.engine).get_columns("inference_calls")}
    assert "requested_model" not in columns and "reasoning_tokens" not in columns
