"""Taking over a host's own ``inference_calls``, and giving it back.

A host that logged its calls before it used the service (Claude Headspace does) has a table
``inference_calls`` of its own: its columns (``cost``, ``input_text``, no ``request_id``),
its constraints, its indexes and its rows. The service's upgrade takes it over:

1. ``check`` (before the upgrade): the table is the host's when it has no ``request_id``
   column. It can be adopted when it has the columns a call log row needs (``REQUIRED``),
   the service's history has not started (else the two disagree about the table), and the
   names it will move to are free. Otherwise one line (``AdoptionError``) says what to do.
2. ``archive`` (revision i0001, before the service's tables are made): the host's table is
   renamed ``HOST_ARCHIVE_TABLE`` (one of SERVICE_TABLES, so the host's autogenerate leaves
   it alone), and so are its schema-wide names (indexes, constraint indexes, sequences:
   ``inference_calls`` in them becomes the archive's name), so nothing of it collides
   with the service's. Its foreign keys and check constraints are set aside (their
   definitions kept in ``HOST_ARCHIVE_CONSTRAINTS``): a frozen copy must never refuse, nor
   cascade from, what the host does to its own tables.
3. ``copy_rows`` (revision i0005): every row is carried into the service's log, under its
   own id, with request_id ``adopted-<id>``: tokens, cost (``cost_usd``; a cache hit's is
   what it saved, as the service records hits), links, level, model, timestamp, error,
   ``cached`` as the status, the prompt. The rollup is emptied, and the upgrade's end
   (``database.finish_upgrade``) rebuilds it from the rows.

Downgrade runs the other way: ``carry_back`` (i0005) moves the rows the service recorded
since into the archive where its columns take them (one warning counts those they refuse,
which stay in the service's log) and drops the adopted ones; ``restore`` (i0001, after the
service's tables are dropped) gives the host its table back under its names, with its
constraints as it defined them: links to rows the host has deleted since are set to NULL,
and a constraint that rows still fail comes back unvalidated, with one warning.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    column,
    delete,
    exists,
    func,
    insert,
    inspect,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine.interfaces import ReflectedForeignKeyConstraint
from sqlalchemy.exc import DBAPIError

from ..row_bounds import USD_QUANTUM
from ..settings import ConfigError
from . import names
from .batches import in_id_order
from .models.base import NAME_PREFIX, UTCDateTime
from .models.inference_call import HOST_ARCHIVE_CONSTRAINTS, HOST_ARCHIVE_TABLE, Money

log = logging.getLogger(__name__)

CALLS = "inference_calls"
# A column every row of the service's log has, which a host's table does not.
SERVICE_MARKER = "request_id"
# What a host's row must have to become a row of the service's log.
REQUIRED = ("id", "timestamp", "level", "model")
# The request_id of a row carried over from the host's table: its id there follows.
ADOPTED_PREFIX = "adopted-"
BATCH = 2000
# SQLite's table rebuild moves the table to this name while it makes it again.
REBUILDING = NAME_PREFIX + "host_inference_calls_rebuilding"
# PostgreSQL's longest identifier.
MAX_NAME = 63


class AdoptionError(ConfigError):
    """The database holds an ``inference_calls`` the service cannot take over as it is."""


# --------------------------------------------------------------------------- looking


def is_foreign(connection: Connection) -> bool:
    """Whether ``inference_calls`` exists and is not the service's (a host's own)."""
    inspector = inspect(connection)
    if not inspector.has_table(CALLS):
        return False
    return SERVICE_MARKER not in {c["name"] for c in inspector.get_columns(CALLS)}


def _archived(name: str) -> str | None:
    return None if HOST_ARCHIVE_TABLE in name else name.replace(CALLS, HOST_ARCHIVE_TABLE, 1)


def _unarchived(name: str) -> str | None:
    return name.replace(HOST_ARCHIVE_TABLE, CALLS, 1) if HOST_ARCHIVE_TABLE in name else None


def check(connection: Connection, version: str | None) -> None:
    """Raise AdoptionError when ``inference_calls`` is a host's that cannot be taken over;
    ``version`` is where the service's history is (None before its first revision)."""
    if not is_foreign(connection):
        return
    what = f"the database's {CALLS} is not the service's call log (it has no {SERVICE_MARKER})"
    if version is not None:
        raise AdoptionError(
            f"{what}, yet the service's history (alembic_version_inference) is at {version}:"
            f" rename the host's table (or drop it), or empty alembic_version_inference"
            f" if the service's tables are gone, then run `inference db upgrade` again"
        )
    inspector = inspect(connection)
    columns = {c["name"] for c in inspector.get_columns(CALLS)}
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise AdoptionError(
            f"{what}, and it cannot be adopted: it has no {', '.join(missing)} column;"
            f" rename it or drop it, then run `inference db upgrade` again"
        )
    if inspector.has_table(HOST_ARCHIVE_TABLE):
        raise AdoptionError(
            f"{what}, and it cannot be kept as {HOST_ARCHIVE_TABLE}: a table of that name"
            f" exists; rename or drop {HOST_ARCHIVE_TABLE}, then run `inference db upgrade`"
            f" again"
        )
    renames = names.planned(connection, CALLS, _archived)
    new_names = [
        HOST_ARCHIVE_TABLE,
        HOST_ARCHIVE_CONSTRAINTS,
        REBUILDING,
        *(new for _, _, new in renames),
    ]
    too_long = [name for name in new_names if len(name) > MAX_NAME]
    clashing = names.taken(connection, new_names)
    if too_long or clashing:
        raise AdoptionError(
            f"{what}, and its names cannot be moved out of the service's way:"
            f" {', '.join(clashing + too_long)} {'is' if len(clashing + too_long) == 1 else 'are'}"
            f" {'taken' if clashing else f'longer than {MAX_NAME} characters'};"
            f" rename {'them' if len(clashing + too_long) > 1 else 'it'}, then run"
            f" `inference db upgrade` again"
        )
    table_ = table(CALLS, column("timestamp"), column("level"), column("model"))
    empty = connection.scalar(
        select(func.count()).where(
            table_.c.timestamp.is_(None) | table_.c.level.is_(None) | table_.c.model.is_(None)
        )
    )
    if empty:
        raise AdoptionError(
            f"{what}, and {empty} of its rows have no timestamp, level or model: give them"
            f" one (or delete them), then run `inference db upgrade` again"
        )


# --------------------------------------------------------------------------- moving


def archive(connection: Connection) -> bool:
    """Move a host's ``inference_calls`` (checked adoptable) out of the service's way, without
    its foreign keys and check constraints; whether there was one."""
    if not is_foreign(connection):
        return False
    set_aside = _set_aside_constraints(connection)
    renames = names.planned(connection, CALLS, _archived)
    q = connection.dialect.identifier_preparer.quote
    connection.exec_driver_sql(f"ALTER TABLE {q(CALLS)} RENAME TO {q(HOST_ARCHIVE_TABLE)}")
    names.apply(connection, HOST_ARCHIVE_TABLE, renames)
    if connection.dialect.name == "sqlite":
        _rebuild_sqlite(connection, HOST_ARCHIVE_TABLE, _bare_sqlite_table(connection))
    log.warning(
        "call log: the host's own %s is kept as %s (%d names moved with it; its %d foreign"
        " keys and check constraints set aside until a downgrade); its rows are carried"
        " into the service's log",
        CALLS, HOST_ARCHIVE_TABLE, len(renames), set_aside,
    )  # fmt: skip
    return True


def restore(connection: Connection) -> bool:
    """Give the host its table back (the service's own is dropped), its constraints too;
    whether there was one."""
    inspector = inspect(connection)
    if not inspector.has_table(HOST_ARCHIVE_TABLE) or inspector.has_table(CALLS):
        return False
    renames = names.planned(connection, HOST_ARCHIVE_TABLE, _unarchived)
    q = connection.dialect.identifier_preparer.quote
    connection.exec_driver_sql(f"ALTER TABLE {q(HOST_ARCHIVE_TABLE)} RENAME TO {q(CALLS)}")
    names.apply(connection, CALLS, renames)
    if inspector.has_table(HOST_ARCHIVE_CONSTRAINTS):
        _put_back_constraints(connection)
        _kept.drop(connection)
    log.warning("call log: the host's %s is back, under its own names", CALLS)
    return True


# --------------------------------------------------------------------------- constraints
#
# The archive is a frozen copy, kept only for a downgrade: nothing on it may refuse or
# cascade from the host's actions on its own tables. A host's foreign key to its projects
# (ON DELETE SET NULL) with a check that a call has a link would refuse the host's delete
# of a project whose calls are archived. So the archive keeps neither, and each one's
# definition is kept in HOST_ARCHIVE_CONSTRAINTS, put back by name after the table is.
# PostgreSQL drops and adds them; SQLite, which can do neither, makes the table again
# (its rebuild) without them and, on downgrade, from the host's own CREATE TABLE.

FOREIGN_KEY = "foreign key"
CHECK = "check"
# SQLite: the host's CREATE TABLE, verbatim.
TABLE = "table"

_kept = Table(
    HOST_ARCHIVE_CONSTRAINTS,
    MetaData(),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("definition", Text, nullable=False),
)


def _set_aside_constraints(connection: Connection) -> int:
    """Record the host table's foreign keys and checks (PostgreSQL: and drop them; SQLite:
    its CREATE TABLE, which the rebuild leaves behind); how many."""
    _kept.create(connection)
    if connection.dialect.name == "postgresql":
        found = connection.execute(
            text(
                "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = to_regclass(:t) AND contype IN ('f', 'c')"
                " ORDER BY contype DESC, conname"
            ),
            {"t": connection.dialect.identifier_preparer.quote(CALLS)},
        ).all()
        rows: list[dict[str, str]] = [
            {
                "kind": FOREIGN_KEY if kind == "f" else CHECK,
                "name": str(name),
                "definition": str(sql),
            }
            for name, kind, sql in found
        ]
        q = connection.dialect.identifier_preparer.quote
        for row in rows:
            connection.exec_driver_sql(f"ALTER TABLE {q(CALLS)} DROP CONSTRAINT {q(row['name'])}")
        count = len(rows)
    else:
        sql: str = connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (CALLS,)
        ).scalar_one()
        rows = [{"kind": TABLE, "name": CALLS, "definition": sql}]
        inspector = inspect(connection)
        count = len(inspector.get_foreign_keys(CALLS)) + len(inspector.get_check_constraints(CALLS))
    connection.execute(insert(_kept), [dict(row, position=i) for i, row in enumerate(rows)])
    return count


def _put_back_constraints(connection: Connection) -> None:
    """Give the host's table (back under its name) the constraints set aside, by their
    names and definitions: links to rows the host no longer has set to NULL first, and a
    constraint that rows still fail kept unvalidated (one warning), so no row is lost."""
    kept = connection.execute(select(_kept).order_by(_kept.c.position)).all()
    if connection.dialect.name == "sqlite":
        (create,) = [row.definition for row in kept if row.kind == TABLE]
        _rebuild_sqlite(connection, CALLS, create, restoring=True)
        return
    q = connection.dialect.identifier_preparer.quote

    def add(row: Any) -> None:
        unvalidated = "" if row.definition.endswith(" NOT VALID") else " NOT VALID"
        connection.exec_driver_sql(
            f"ALTER TABLE {q(CALLS)} ADD CONSTRAINT {q(row.name)} {row.definition}{unvalidated}"
        )

    # Each added unvalidated, then validated. The foreign keys first, read back to set the
    # links they would refuse to NULL, then the checks (which an UPDATE of a row must pass).
    for row in kept:
        if row.kind == FOREIGN_KEY:
            add(row)
    foreign_keys = {str(fk["name"]): fk for fk in inspect(connection).get_foreign_keys(CALLS)}
    for row in kept:
        if row.kind == FOREIGN_KEY:
            _null_missing_links(connection, CALLS, foreign_keys[row.name])
    for row in kept:
        if row.kind != FOREIGN_KEY:
            add(row)
    checks = {
        str(ck["name"]): ck["sqltext"] for ck in inspect(connection).get_check_constraints(CALLS)
    }
    for row in kept:
        if row.definition.endswith(" NOT VALID"):
            continue  # the host's own was so
        savepoint = connection.begin_nested()
        try:
            connection.exec_driver_sql(f"ALTER TABLE {q(CALLS)} VALIDATE CONSTRAINT {q(row.name)}")
        except DBAPIError:
            savepoint.rollback()
            if row.kind == FOREIGN_KEY:
                failing = _missing_links(connection, CALLS, foreign_keys[row.name])
            else:
                failing = _failing_check(connection, CALLS, checks[row.name])
            _warn_failing(row.name, failing, " NOT VALID")
        else:
            savepoint.commit()


def _warn_failing(constraint: str, failing: int, how: str) -> None:
    log.warning(
        "call log: the host's %s has its constraint %s back%s: %d of its rows fail it"
        " (kept, as the host had them or the service recorded them)",
        CALLS, constraint, how, failing,
    )  # fmt: skip


def _link_condition(
    connection: Connection, name: str, fk: ReflectedForeignKeyConstraint
) -> tuple[Any, Any]:
    """(the table, SQL: a row's link points at no row of the table the key refers to)."""
    columns = fk["constrained_columns"]
    source = table(name, *(column(c) for c in columns))
    target = table(
        fk["referred_table"],
        *(column(c) for c in fk["referred_columns"]),
        schema=fk.get("referred_schema"),
    )
    pairs = zip(columns, fk["referred_columns"], strict=True)
    matched = exists().where(and_(*(target.c[r] == source.c[c] for c, r in pairs)))
    return source, and_(*(source.c[c].is_not(None) for c in columns), ~matched)


def _missing_links(connection: Connection, name: str, fk: ReflectedForeignKeyConstraint) -> int:
    source, missing = _link_condition(connection, name, fk)
    return int(connection.scalar(select(func.count()).select_from(source).where(missing)) or 0)


def _null_missing_links(
    connection: Connection, name: str, fk: ReflectedForeignKeyConstraint
) -> None:
    # As the service's own links are reconciled (link_keys.py).
    source, missing = _link_condition(connection, name, fk)
    columns = fk["constrained_columns"]
    nulled = connection.execute(
        update(source).where(missing).values({c: None for c in columns})
    ).rowcount
    if nulled:
        log.warning(
            "call log: %d rows of the host's %s linked to %s rows it no longer has;"
            " their %s now NULL",
            nulled, CALLS, fk["referred_table"], ", ".join(columns),
        )  # fmt: skip


def _failing_check(connection: Connection, name: str, sqltext: str) -> int:
    failing = select(func.count()).select_from(table(name)).where(text(f"NOT ({sqltext})"))
    return int(connection.scalar(failing) or 0)


def _bare_sqlite_table(connection: Connection) -> str:
    """A CREATE TABLE of the archive as it is, without foreign keys and checks: its columns
    (declared types, NOT NULL, defaults), primary key and unique constraints."""
    q = connection.dialect.identifier_preparer.quote
    name = HOST_ARCHIVE_TABLE
    columns = connection.exec_driver_sql(f"PRAGMA table_xinfo({q(name)})").all()
    parts = []
    for _cid, col, declared, notnull, default, _pk, hidden in columns:
        if hidden:  # a generated column: the host's CREATE TABLE makes it again
            continue
        words = [q(str(col)), str(declared), "NOT NULL" if notnull else ""]
        words.append("" if default is None else f"DEFAULT ({default})")
        parts.append(" ".join(word for word in words if word))
    key = [str(c[1]) for c in sorted(columns, key=lambda c: int(c[5])) if c[5]]
    if key:
        parts.append(f"PRIMARY KEY ({', '.join(q(c) for c in key)})")
    for _seq, index, _unique, origin, _partial in connection.exec_driver_sql(
        f"PRAGMA index_list({q(name)})"
    ).all():
        if origin == "u":
            info = connection.exec_driver_sql(f"PRAGMA index_info({q(str(index))})").all()
            parts.append(f"UNIQUE ({', '.join(q(str(c[2])) for c in info)})")
    return f"CREATE TABLE {q(name)} ({', '.join(parts)})"


def _rebuild_sqlite(
    connection: Connection, name: str, create: str, *, restoring: bool = False
) -> None:
    """SQLite's table rebuild: ``name`` made again by ``create`` (a CREATE TABLE of that
    name), with its rows and indexes. ``restoring``: the host's own, whose links to rows it
    no longer has are set to NULL first and whose checks a row may fail (kept, one
    warning), as PostgreSQL keeps such a constraint NOT VALID."""
    q = connection.dialect.identifier_preparer.quote
    indexes: list[str] = list(
        connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master"
            " WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (name,),
        )
        .scalars()
        .all()
    )
    connection.exec_driver_sql(f"ALTER TABLE {q(name)} RENAME TO {q(REBUILDING)}")
    connection.exec_driver_sql(create)
    inspector = inspect(connection)
    old = {c["name"] for c in inspector.get_columns(REBUILDING) if "computed" not in c}
    carried = [
        c["name"] for c in inspector.get_columns(name) if c["name"] in old and "computed" not in c
    ]
    source = table(REBUILDING, *(column(c) for c in carried))
    copy = insert(table(name, *(column(c) for c in carried))).from_select(
        carried, select(*source.c)
    )
    if restoring:
        for fk in inspector.get_foreign_keys(name):
            _null_missing_links(connection, REBUILDING, fk)
    savepoint = connection.begin_nested()
    try:
        connection.execute(copy)
    except DBAPIError:
        savepoint.rollback()
        if not restoring:
            raise
        for check in inspector.get_check_constraints(name):
            failing = _failing_check(connection, REBUILDING, check["sqltext"])
            if failing:
                _warn_failing(str(check["name"]), failing, "")
        # SQLite's counterpart of NOT VALID: the rows are kept, later writes are checked.
        connection.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        try:
            connection.execute(copy)
        finally:
            connection.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")
    else:
        savepoint.commit()
    connection.exec_driver_sql(f"DROP TABLE {q(REBUILDING)}")
    for sql in indexes:
        connection.exec_driver_sql(sql)


def _host_table(connection: Connection) -> Table:
    return Table(HOST_ARCHIVE_TABLE, MetaData(), autoload_with=connection)


# The service's log as revision i0005 has it, with the columns an adopted row sets.
_ours = table(
    CALLS,
    column("id", Integer),
    column("request_id"),
    column("timestamp", UTCDateTime()),
    column("level"),
    column("purpose"),
    column("model"),
    column("requested_model"),
    column("status"),
    column("input_tokens", Integer),
    column("output_tokens", Integer),
    column("input_hash"),
    column("input_text"),
    column("result_text"),
    column("latency_ms", Integer),
    column("cost_usd", Money),
    column("saved_cost_usd", Money),
    column("error_message"),
    column("cached", Boolean),
    column("attempts", Integer),
    column("project_id", Integer),
    column("agent_id", Integer),
    column("command_id", Integer),
    column("turn_id", Integer),
)
# Widths of the service's bounded columns (as revision i0001 made them).
_WIDTH = {"level": 16, "purpose": 200, "model": 200, "input_hash": 64}


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _usd(value: Any) -> Decimal | None:
    if value is None:
        return None
    return Decimal(str(value)).quantize(USD_QUANTUM)


def _text(value: Any, name: str) -> str:
    return ("" if value is None else str(value)).replace("\x00", "")[: _WIDTH[name]]


def _adopted_row(row: Any, host: Table) -> dict[str, Any]:
    get = row._mapping.get
    cached = bool(get("cached") or False)
    error = get("error_message")
    cost = _usd(get("cost", get("cost_usd")))
    return {
        "id": row.id,
        "request_id": f"{ADOPTED_PREFIX}{row.id}",
        "timestamp": _utc(row.timestamp),
        "level": _text(row.level, "level"),
        "purpose": _text(get("purpose"), "purpose"),
        "model": _text(row.model, "model"),
        "requested_model": _text(row.model, "model"),
        "status": "cached" if cached else "error" if error is not None else "ok",
        "input_tokens": get("input_tokens") or 0,
        "output_tokens": get("output_tokens") or 0,
        "input_hash": _text(get("input_hash"), "input_hash"),
        "input_text": get("input_text"),
        "result_text": get("result_text"),
        "latency_ms": get("latency_ms") or 0,
        # As the service records a cache hit: it cost nothing, and saved what it had cost.
        "cost_usd": Decimal(0) if cached and cost is not None else cost,
        "saved_cost_usd": cost if cached else None,
        "error_message": error,
        "cached": cached,
        "attempts": 0 if cached else 1,
        "project_id": get("project_id"),
        "agent_id": get("agent_id"),
        "command_id": get("command_id", get("task_id")),
        "turn_id": get("turn_id"),
    }


def copy_rows(connection: Connection) -> int:
    """Carry every row of the archived host table into the service's log; how many. The
    rollup is emptied, for the upgrade's end to rebuild from every row."""
    if not inspect(connection).has_table(HOST_ARCHIVE_TABLE):
        return 0
    host = _host_table(connection)
    copied = 0
    for rows in in_id_order(connection, select(host), host.c.id, BATCH):
        connection.execute(insert(_ours), [_adopted_row(row, host) for row in rows])
        copied += len(rows)
    _advance_sequence(connection, CALLS)
    connection.execute(delete(table("inference_usage_rollup")))
    log.warning("call log: %d rows of the host's %s carried into the service's log", copied, CALLS)
    return copied


def _advance_sequence(connection: Connection, name: str) -> None:
    # Ids were written as they were: the next one the database gives must follow them.
    if connection.dialect.name != "postgresql":
        return
    q = connection.dialect.identifier_preparer.quote(name)
    sequence = connection.scalar(select(func.pg_get_serial_sequence(q, "id")))
    top = connection.scalar(select(func.max(table(name, column("id")).c.id)))
    if sequence is not None and top is not None:
        connection.execute(select(func.setval(sequence, top)))


def _host_row(row: Any, host: Table) -> dict[str, Any]:
    """A service row as the host's table has it (only the columns it has)."""
    cached = bool(row.cached)
    cost = row.saved_cost_usd if cached else row.cost_usd
    values = {
        "id": row.id,
        "timestamp": row.timestamp,
        "level": row.level,
        "purpose": row.purpose,
        "model": row.model,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "input_hash": row.input_hash,
        "input_text": row.input_text,
        "result_text": row.result_text,
        "latency_ms": row.latency_ms,
        "cost": None if cost is None else float(cost),
        "cost_usd": cost,
        "error_message": row.error_message,
        "cached": cached,
        "project_id": row.project_id,
        "agent_id": row.agent_id,
        "command_id": row.command_id,
        "task_id": row.command_id,
        "turn_id": row.turn_id,
    }
    out = {name: value for name, value in values.items() if name in host.c}
    stamp = host.c.get("timestamp")
    if stamp is not None and not getattr(stamp.type, "timezone", False):
        out["timestamp"] = row.timestamp.astimezone(UTC).replace(tzinfo=None)
    return out


def carry_back(connection: Connection) -> tuple[int, int]:
    """Move the rows the service recorded since the adoption into the archived host table
    where its columns take them, and drop the adopted ones; (moved, refused)."""
    if not inspect(connection).has_table(HOST_ARCHIVE_TABLE):
        return 0, 0
    host = _host_table(connection)
    adopted = _ours.c.request_id.like(f"{ADOPTED_PREFIX}%")
    moved_ids: list[int] = []
    refused = 0
    later = select(_ours).where(~adopted)
    for rows in in_id_order(connection, later, _ours.c.id, BATCH):
        values = [_host_row(row, host) for row in rows]
        if _insert(connection, host, values):
            moved_ids += [row.id for row in rows]
            continue
        for row, one in zip(rows, values, strict=True):  # find the ones it refuses
            if _insert(connection, host, [one]):
                moved_ids.append(row.id)
            else:
                refused += 1
    _advance_sequence(connection, HOST_ARCHIVE_TABLE)
    for start in range(0, len(moved_ids), BATCH):
        chunk = moved_ids[start : start + BATCH]
        connection.execute(delete(_ours).where(_ours.c.id.in_(chunk)))
    connection.execute(delete(_ours).where(adopted))
    connection.execute(delete(table("inference_usage_rollup")))
    if refused:
        log.warning(
            "call log: %d rows the service recorded are refused by the host's %s (its"
            " columns: e.g. a model name longer than it takes); they stay in the service's"
            " log and go with it", refused, CALLS,
        )  # fmt: skip
    log.warning("call log: %d rows the service recorded carried into the host's %s",
                len(moved_ids), CALLS)  # fmt: skip
    return len(moved_ids), refused


def _insert(connection: Connection, host: Table, values: list[dict[str, Any]]) -> bool:
    savepoint = connection.begin_nested()
    try:
        connection.execute(insert(host), values)
    except DBAPIError:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True
