"""A host's own ``inference_calls`` taken over by the service's upgrade, and given back.

The host's table is built here as Claude Headspace's migrations leave it (its columns,
default constraint names, its check constraint, its eight ``ix_inference_calls_*`` indexes),
with rows, on SQLite and on PostgreSQL (both drivers).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url

from headspace_inference import include_name
from headspace_inference.calllog.adopt import AdoptionError
from headspace_inference.calllog.database import SERVICE_HISTORY, Database
from headspace_inference.calllog.models import (
    HOST_ARCHIVE_CONSTRAINTS,
    HOST_ARCHIVE_TABLE,
    InferenceCall,
)
from headspace_inference.calllog.rollup import count_calls, rollup_disagreements
from headspace_inference.operate.routes import parse_usage_query
from headspace_inference.operate.usage import usage_report
from headspace_inference.settings import DatabaseSettings

HOST_ROWS = 40
START = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def host_metadata() -> MetaData:
    """The host's tables, as its migrations make them (no naming convention: PostgreSQL's
    default names, as the host has)."""
    md = MetaData()
    Table("projects", md, Column("id", Integer, primary_key=True), Column("name", Text))
    Table(
        "agents", md, Column("id", Integer, primary_key=True),
        Column("project_id", ForeignKey("projects.id")),
    )  # fmt: skip
    Table(
        "commands", md, Column("id", Integer, primary_key=True),
        Column("agent_id", ForeignKey("agents.id")),
    )  # fmt: skip
    Table(
        "turns", md, Column("id", Integer, primary_key=True),
        Column("command_id", ForeignKey("commands.id")),
    )  # fmt: skip
    calls = Table(
        "inference_calls",
        md,
        Column("id", Integer, primary_key=True),
        Column("timestamp", DateTime(timezone=True), nullable=False),
        Column("level", String(20), nullable=False),
        Column("purpose", Text, nullable=False),
        Column("model", String(100), nullable=False),
        Column("input_tokens", Integer),
        Column("output_tokens", Integer),
        Column("input_hash", String(64)),
        Column("result_text", Text),
        Column("latency_ms", Integer),
        Column("cost", Float),
        Column("error_message", Text),
        Column("cached", Boolean, nullable=False),
        Column("project_id", ForeignKey("projects.id", ondelete="SET NULL")),
        Column("agent_id", ForeignKey("agents.id", ondelete="SET NULL")),
        Column("command_id", ForeignKey("commands.id", ondelete="SET NULL")),
        Column("turn_id", ForeignKey("turns.id", ondelete="SET NULL")),
        Column("input_text", Text),
        CheckConstraint(
            "COALESCE(project_id, agent_id, command_id, turn_id) IS NOT NULL",
            name="ck_inference_calls_has_parent",
        ),
    )
    for name, columns in [
        ("timestamp", ["timestamp"]),
        ("level", ["level"]),
        ("input_hash", ["input_hash"]),
        ("project_id", ["project_id"]),
        ("level_timestamp", ["level", "timestamp"]),
        ("model_timestamp", ["model", "timestamp"]),
        ("agent_id", ["agent_id"]),
        ("project_timestamp", ["project_id", "timestamp"]),
    ]:
        Index(f"ix_inference_calls_{name}", *(calls.c[c] for c in columns))
    return md


def host_row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "timestamp": START + timedelta(minutes=37 * i),
        "level": ("turn", "command", "project", "objective")[i % 4],
        "purpose": f"purpose {i % 3}",
        "model": "anthropic/claude-haiku-4.5" if i % 2 else "anthropic/claude-sonnet-4.5",
        "input_tokens": 100 + i,
        "output_tokens": 10 + i,
        "input_hash": f"{i:064x}",
        "input_text": f"prompt number {i}",
        "result_text": None if i % 7 == 0 else f"answer {i}",
        "latency_ms": 50 * i,
        "cost": None if i % 11 == 0 else 0.000125 * i,
        "error_message": "upstream failed" if i % 7 == 0 else None,
        "cached": i % 5 == 0,
        "project_id": 1 + i % 2,
        "agent_id": 1 if i % 3 == 0 else None,
        "command_id": None,
        "turn_id": None,
    }


def make_host(engine: Engine) -> MetaData:
    md = host_metadata()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            md.tables["projects"].insert(), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
        )
        conn.execute(md.tables["agents"].insert(), [{"id": 1, "project_id": 1}])
        conn.execute(
            md.tables["inference_calls"].insert(), [host_row(i) for i in range(1, HOST_ROWS + 1)]
        )
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT setval('inference_calls_id_seq', :n)"), {"n": HOST_ROWS})
    return md


def schema_names(engine: Engine, table: str) -> dict[str, Any]:
    """The names a table has: indexes, constraints, sequences."""
    inspector = inspect(engine)
    out: dict[str, Any] = {
        "indexes": sorted(ix["name"] for ix in inspector.get_indexes(table)),
        "fks": sorted(str(fk["name"]) for fk in inspector.get_foreign_keys(table)),
        "pk": inspector.get_pk_constraint(table)["name"],
    }
    if engine.dialect.name == "postgresql":
        out["checks"] = sorted(str(ck["name"]) for ck in inspector.get_check_constraints(table))
        with engine.connect() as conn:
            out["sequence"] = conn.execute(
                text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}
            ).scalar()
    return out


def constraint_definitions(engine: Engine, table: str) -> dict[str, str]:
    """PostgreSQL: each foreign key's and check's definition, by name. SQLite: the table's
    CREATE TABLE, where they are, when it has any."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            found = conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = to_regclass(:t) AND contype IN ('f', 'c')"
                ),
                {"t": table},
            )
            return {str(name): str(sql) for name, sql in found}
        found = conn.execute(
            text("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name = :t"),
            {"t": table},
        )
        return {str(name): str(sql) for name, sql in found if "REFERENCES" in sql or "CHECK" in sql}


def all_index_names(engine: Engine) -> set[str]:
    inspector = inspect(engine)
    return {
        str(ix["name"])
        for name in inspector.get_table_names()
        for ix in inspector.get_indexes(name)
    }


DRIVERS = ["sqlite", "postgresql+psycopg", "postgresql+psycopg2"]


@pytest.fixture(params=DRIVERS)
def host_db(request: pytest.FixtureRequest) -> Any:
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        base = make_url(request.getfixturevalue("postgres_url"))
        url = base.set(drivername=request.param).render_as_string(hide_password=False)
    db = Database(DatabaseSettings(url=url))
    request.addfinalizer(db.dispose)
    return db


def usd(amount: float) -> Decimal:
    return Decimal(str(amount)).quantize(Decimal("1e-12"))


def usage(db: Database) -> dict[str, Any]:
    with db.sessions() as session:
        return usage_report(
            session, parse_usage_query({}, ("turn", "command", "project", "objective"))
        )


def test_a_host_s_call_log_is_adopted_and_given_back(
    host_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    engine = host_db.engine
    md = make_host(engine)
    host_names = schema_names(engine, "inference_calls")
    assert len(host_names["indexes"]) == 8
    host_definitions = constraint_definitions(engine, "inference_calls")
    assert len(host_definitions) == (5 if engine.dialect.name == "postgresql" else 1)
    before = [dict(r._mapping) for r in _host_rows(engine, "inference_calls")]
    assert len(before) == HOST_ROWS

    host_db.upgrade()

    assert host_db.revisions() == {"inference": SERVICE_HISTORY.head()}
    # The host's table, whole, under the service's name, its names moved with it.
    assert len(_host_rows(engine, HOST_ARCHIVE_TABLE)) == HOST_ROWS
    archived = schema_names(engine, HOST_ARCHIVE_TABLE)
    assert len(archived["indexes"]) == 8
    assert all(HOST_ARCHIVE_TABLE in name for name in archived["indexes"])
    if engine.dialect.name == "postgresql":
        assert HOST_ARCHIVE_TABLE in archived["pk"] and HOST_ARCHIVE_TABLE in archived["sequence"]
    # Without what reaches the host's tables or could refuse its actions on them.
    assert archived["fks"] == [] and archived.get("checks", []) == []
    assert constraint_definitions(engine, HOST_ARCHIVE_TABLE) == {}
    # The service's own names are its own: none is a host's default.
    ours = schema_names(engine, "inference_calls")
    assert all(name.startswith("hinf_") for name in ours["indexes"] + ours["fks"] + [ours["pk"]])
    assert not [n for n in all_index_names(engine) if n.startswith("ix_inference_calls")]
    # The host's autogenerate never sees the archive (nothing for it to drop).
    assert include_name(HOST_ARCHIVE_TABLE, "table") is False
    assert HOST_ARCHIVE_CONSTRAINTS in inspect(engine).get_table_names()
    assert include_name(HOST_ARCHIVE_CONSTRAINTS, "table") is False

    # Every row carried over: ids, tokens, cost, links, level, model, time, error, status, prompt.
    with host_db.sessions() as session:
        calls = {c.id: c for c in session.scalars(select(InferenceCall))}
        assert count_calls(session) == (HOST_ROWS, HOST_ROWS)
        assert rollup_disagreements(session) == []
    assert sorted(calls) == list(range(1, HOST_ROWS + 1))
    for row in before:
        call = calls[row["id"]]
        assert call.request_id == f"adopted-{row['id']}"
        assert call.timestamp == row["timestamp"].astimezone(UTC)
        assert (call.level, call.model, call.purpose) == (
            row["level"],
            row["model"],
            row["purpose"],
        )
        assert (call.input_tokens, call.output_tokens) == (
            row["input_tokens"],
            row["output_tokens"],
        )
        assert (call.input_text, call.result_text) == (row["input_text"], row["result_text"])
        assert call.latency_ms == row["latency_ms"]
        assert (call.project_id, call.agent_id) == (row["project_id"], row["agent_id"])
        assert call.error_message == row["error_message"]
        assert call.cached == row["cached"]
        expected_status = "cached" if row["cached"] else "error" if row["error_message"] else "ok"
        assert call.status == expected_status
        cost = None if row["cost"] is None else usd(row["cost"])
        if row["cached"]:
            assert (call.cost_usd, call.saved_cost_usd) == (
                None if cost is None else Decimal(0), cost,
            )  # fmt: skip
        else:
            assert call.cost_usd == cost
    # /usage counts them.
    report = usage(host_db)
    assert report["total_calls"] == HOST_ROWS
    assert report["cache_hits"] == sum(1 for r in before if r["cached"])
    spent = sum(usd(r["cost"]) for r in before if r["cost"] is not None and not r["cached"])
    assert report["total_cost"] == pytest.approx(float(spent))

    # The service records on: a call with a link, one with none (which the host's check
    # refuses), one with a model name longer than the host's column (PostgreSQL refuses it).
    with host_db.sessions.begin() as session:
        for request_id, project, model in (
            ("new-linked", 2, "m"), ("new-unlinked", None, "m"), ("new-long", 2, "m" * 150),
        ):  # fmt: skip
            session.add(InferenceCall(
                request_id=request_id, timestamp=datetime(2026, 4, 1, tzinfo=UTC), level="turn",
                purpose="later", model=model, status="ok", input_hash="h", project_id=project,
                input_text="later prompt", cost_usd=Decimal("0.5"),
            ))  # fmt: skip
    with host_db.sessions() as session:
        new_ids = sorted(c.id for c in session.scalars(select(InferenceCall)) if c.id > HOST_ROWS)
    assert len(new_ids) == 3  # ids follow the host's

    with caplog.at_level(logging.WARNING, logger="headspace_inference.calllog.adopt"):
        host_db.downgrade("base")

    postgres = engine.dialect.name == "postgresql"
    refused = "1 rows the service recorded are refused by the host's inference_calls"
    assert (refused in caplog.text) == postgres
    # The unlinked call is kept: the host's check comes back, unvalidated on PostgreSQL.
    how = " NOT VALID" if postgres else ""
    assert (
        f"inference_calls has its constraint ck_inference_calls_has_parent back{how}:"
        f" 1 of its rows fail it" in caplog.text
    )
    tables = set(inspect(engine).get_table_names())
    assert "inference_calls" in tables and HOST_ARCHIVE_TABLE not in tables
    assert HOST_ARCHIVE_CONSTRAINTS not in tables
    assert schema_names(engine, "inference_calls") == host_names
    if postgres:
        check = "ck_inference_calls_has_parent"
        host_definitions[check] += " NOT VALID"
    assert constraint_definitions(engine, "inference_calls") == host_definitions
    after = [dict(r._mapping) for r in _host_rows(engine, "inference_calls")]
    assert after[:HOST_ROWS] == before
    assert len(after) == HOST_ROWS + (2 if postgres else 3)
    linked, unlinked = after[HOST_ROWS : HOST_ROWS + 2]
    assert (linked["purpose"], linked["project_id"], linked["cost"], linked["input_text"]) == (
        "later", 2, 0.5, "later prompt",
    )  # fmt: skip
    assert unlinked["purpose"] == "later"
    assert [unlinked[link] for link in ("project_id", "agent_id", "command_id", "turn_id")] == [
        None, None, None, None,
    ]  # fmt: skip
    # The host's own inserts go on from its sequence.
    with engine.begin() as conn:
        new = dict(host_row(1), id=None)
        del new["id"]
        conn.execute(md.tables["inference_calls"].insert(), [new])

    # And up again: everything the host has is carried over once more.
    host_db.upgrade()
    with host_db.sessions() as session:
        everything = HOST_ROWS + (3 if postgres else 4)
        assert count_calls(session) == (everything, everything)
        assert rollup_disagreements(session) == []


def _host_rows(engine: Engine, name: str) -> list[Any]:
    # Its columns only (SQLAlchemy warns reflecting a NOT VALID check into a Table).
    columns = inspect(engine).get_columns(name)
    table = Table(name, MetaData(), *(Column(c["name"], c["type"]) for c in columns))
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).all()
    if engine.dialect.name == "sqlite":  # SQLite keeps no zone: the host wrote UTC
        return [_utc_row(r) for r in rows]
    return rows


class _Row:
    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping


def _utc_row(row: Any) -> _Row:
    mapping = dict(row._mapping)
    mapping["timestamp"] = mapping["timestamp"].replace(tzinfo=UTC)
    return _Row(mapping)


def test_a_table_without_the_columns_needed_is_refused_in_one_line(host_db: Database) -> None:
    with host_db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE inference_calls (id INTEGER PRIMARY KEY, note TEXT)"))
    with pytest.raises(AdoptionError) as raised:
        host_db.upgrade()
    message = str(raised.value)
    assert "\n" not in message
    assert "has no timestamp, level, model column" in message
    assert "rename it or drop it" in message
    assert host_db.revisions() == {"inference": None}
    assert set(inspect(host_db.engine).get_table_names()) == {"inference_calls"}


def test_an_archive_name_already_taken_is_refused_in_one_line(host_db: Database) -> None:
    make_host(host_db.engine)
    with host_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {HOST_ARCHIVE_TABLE} (id INTEGER PRIMARY KEY)"))
    with pytest.raises(
        AdoptionError, match=f"a table of that name exists; rename or drop {HOST_ARCHIVE_TABLE}"
    ):
        host_db.upgrade()
    assert len(_host_rows(host_db.engine, "inference_calls")) == HOST_ROWS


def test_a_constraints_table_name_already_taken_is_refused_in_one_line(
    host_db: Database,
) -> None:
    make_host(host_db.engine)
    with host_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {HOST_ARCHIVE_CONSTRAINTS} (id INTEGER PRIMARY KEY)"))
    with pytest.raises(AdoptionError, match=f"{HOST_ARCHIVE_CONSTRAINTS} is taken; rename it"):
        host_db.upgrade()
    assert len(_host_rows(host_db.engine, "inference_calls")) == HOST_ROWS
    assert host_db.revisions() == {"inference": None}


def test_a_purge_deletes_adopted_rows_from_the_host_s_table_too(host_db: Database) -> None:
    from headspace_inference.calllog.purge import purge

    make_host(host_db.engine)
    host_definitions = constraint_definitions(host_db.engine, "inference_calls")
    host_db.upgrade()
    with host_db.sessions.begin() as session:
        assert purge(session, project_id=1) == HOST_ROWS // 2
    with host_db.sessions() as session:
        assert count_calls(session) == (HOST_ROWS // 2, HOST_ROWS // 2)
        assert rollup_disagreements(session) == []
    assert len(_host_rows(host_db.engine, HOST_ARCHIVE_TABLE)) == HOST_ROWS // 2
    host_db.downgrade("base")  # what the host purged does not come back
    back = _host_rows(host_db.engine, "inference_calls")
    assert len(back) == HOST_ROWS // 2 and {r._mapping["project_id"] for r in back} == {2}
    # Every row passes the host's constraints: they are back exactly as its DDL made them.
    assert constraint_definitions(host_db.engine, "inference_calls") == host_definitions


def test_the_host_deletes_a_project_whose_calls_are_archived(
    host_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The archive never refuses the host an action on its own tables: deleting a project
    (its agents first) would set an archived call's last link to NULL, which the host's
    check constraint refuses, were it kept on the archive."""
    engine = host_db.engine
    md = make_host(engine)
    with engine.begin() as conn:  # a call of the host linked to its agent only
        conn.execute(
            md.tables["inference_calls"].insert(),
            [dict(host_row(HOST_ROWS + 1), project_id=None, agent_id=1)],
        )
    host_definitions = constraint_definitions(engine, "inference_calls")
    host_db.upgrade()

    with engine.begin() as conn:
        conn.execute(md.tables["agents"].delete().where(md.tables["agents"].c.project_id == 1))
        conn.execute(md.tables["projects"].delete().where(md.tables["projects"].c.id == 1))

    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(md.tables["projects"])) == 1
    # The archive is frozen: its rows keep what the host had when it was adopted.
    assert len(_host_rows(engine, HOST_ARCHIVE_TABLE)) == HOST_ROWS + 1

    with caplog.at_level(logging.WARNING, logger="headspace_inference.calllog.adopt"):
        host_db.downgrade("base")

    # Every row is given back. Links to the deleted project and agent are NULL, as the
    # host's own foreign keys would have made them; the 20 calls of project 1 and the
    # agent's own call are left with no link, so the host's check comes back unvalidated.
    back = {r._mapping["id"]: r._mapping for r in _host_rows(engine, "inference_calls")}
    assert sorted(back) == list(range(1, HOST_ROWS + 2))
    assert {r["project_id"] for r in back.values()} == {None, 2}
    assert {r["agent_id"] for r in back.values()} == {None}
    assert "20 rows of the host's inference_calls linked to projects rows" in caplog.text
    assert "14 rows of the host's inference_calls linked to agents rows" in caplog.text
    how = " NOT VALID" if engine.dialect.name == "postgresql" else ""
    assert f"ck_inference_calls_has_parent back{how}: 21 of its rows fail it" in caplog.text
    definitions = constraint_definitions(engine, "inference_calls")
    if engine.dialect.name == "postgresql":
        host_definitions["ck_inference_calls_has_parent"] += " NOT VALID"
    assert definitions == host_definitions
