"""Renaming a table's schema-wide names: its indexes, its constraints, its sequences.

PostgreSQL keeps index names (a primary key's and a unique constraint's included) and
sequence names per schema, and SQLite keeps index names per database: two tables cannot
both have an ``ix_inference_calls_level``. The service's revision i0003 moves its own names
under its prefix with these, and the adoption of a host's ``inference_calls``
(calllog/adopt.py) moves the host's out of the way and back.

``rename(old)`` gives the new name, or None to leave a name as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlalchemy import Connection, bindparam, inspect, text

Renamer = Callable[[str], "str | None"]


def planned(connection: Connection, table: str, rename: Renamer) -> list[tuple[str, str, str]]:
    """(kind, old, new) for every name of ``table`` that ``rename`` moves: kinds
    ``constraint``, ``index``, ``sequence`` (PostgreSQL) or ``index`` (SQLite, whose
    constraint names are the table's own and collide with nothing)."""
    out: list[tuple[str, str, str]] = []
    rows: list[tuple[str, str]]
    if connection.dialect.name == "postgresql":
        found = connection.execute(
            text(
                "SELECT 'constraint', conname FROM pg_constraint"
                " WHERE conrelid = to_regclass(:t)"
                " UNION ALL SELECT 'index', c.relname FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass(:t)"
                " AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid"
                " AND k.conrelid = i.indrelid)"
                " UNION ALL SELECT 'sequence', s.relname FROM pg_depend d"
                " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
                " WHERE d.refobjid = to_regclass(:t) AND d.deptype IN ('a', 'i')"
                " ORDER BY 1, 2"
            ),
            {"t": _quote(connection, table)},
        )
        rows = [(str(kind), str(name)) for kind, name in found]
    else:
        indexes = inspect(connection).get_indexes(table)
        rows = [("index", str(ix["name"])) for ix in indexes]
    for kind, old in rows:
        new = rename(old)
        if new is not None and new != old:
            out.append((kind, old, new))
    return out


def taken(connection: Connection, names: list[str]) -> list[str]:
    """The names among ``names`` that an index, a sequence or a table already has."""
    if not names:
        return []
    if connection.dialect.name == "postgresql":
        sql = text(
            "SELECT relname FROM pg_class WHERE relname IN :names"
            " AND relnamespace = current_schema()::regnamespace"
        )
    else:
        sql = text("SELECT name FROM sqlite_master WHERE name IN :names")
    sql = sql.bindparams(bindparam("names", expanding=True))
    return sorted(connection.execute(sql, {"names": names}).scalars())


def apply(connection: Connection, table: str, renames: list[tuple[str, str, str]]) -> None:
    """Carry out ``renames`` (as ``planned`` gives them) on ``table``."""
    q = connection.dialect.identifier_preparer.quote
    for kind, old, new in renames:
        if connection.dialect.name == "postgresql":
            statement = {
                "constraint": f"ALTER TABLE {q(table)} RENAME CONSTRAINT {q(old)} TO {q(new)}",
                "index": f"ALTER INDEX {q(old)} RENAME TO {q(new)}",
                "sequence": f"ALTER SEQUENCE {q(old)} RENAME TO {q(new)}",
            }[kind]
            connection.exec_driver_sql(statement)
            continue
        # SQLite cannot rename an index: made again, from its own definition, by the new name.
        sql = connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (old,)
        ).scalar()
        head = re.match(
            r'\s*CREATE\s+(UNIQUE\s+)?INDEX\s+(IF\s+NOT\s+EXISTS\s+)?("[^"]+"|`[^`]+`|\[[^]]+\]|\S+)',
            sql or "",
            re.IGNORECASE,
        )
        if head is None:
            raise RuntimeError(f"cannot read the definition of index {old!r}")
        connection.exec_driver_sql(f"DROP INDEX {q(old)}")
        connection.exec_driver_sql(
            f"CREATE {head.group(1) or ''}INDEX {q(new)}{sql[head.end() :]}"  # type: ignore[index]
        )


def _quote(connection: Connection, table: str) -> str:
    return connection.dialect.identifier_preparer.quote(table)
