"""The tables a call links to, as the service sees them: by name, never as its own models.

They are the host's (or the standalone app's), created by its migrations, possibly after the
service's, possibly never (a host with no ``turns``). So the service reads them through a
table name and an ``id`` column only, and asks the database whether they exist.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, column, exists, inspect, select, table
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, TableClause

from .inference_call import LINK_TABLES


def link_table(name: str) -> TableClause:
    """The table the link ``name`` (e.g. ``project_id``) refers to, with its ``id`` column."""
    return table(LINK_TABLES[name], column("id"))


def has_table(connection: Connection, name: str) -> bool:
    """Whether the table exists in the connection's database (default schema)."""
    return inspect(connection).has_table(name)


def link_exists(
    session: Session, name: str, value: int, *, table_known: bool = False
) -> bool | None:
    """Whether row ``value`` of the link's table exists; None when the table itself does not
    (asked first, unless ``table_known``)."""
    if not table_known and not has_table(session.connection(), LINK_TABLES[name]):
        return None
    target = link_table(name)
    return session.scalar(select(exists().where(target.c.id == value))) is True


def linked_row_exists(name: str, key: Any) -> ColumnElement[bool]:
    """SQL: a row of the link's table has id ``key`` (the table must exist)."""
    target = link_table(name)
    return exists().where(target.c.id == key)


def while_linked_row_exists(session: Session, name: str, key: Any) -> list[ColumnElement[bool]]:
    """The conditions under which a call counts for link ``name`` = ``key``: its row exists
    (none when the table itself does not). A link is followed only while its row exists:
    until the link key is added (link_keys.py) a deleted row's calls keep its id, and /usage
    and /calls must both count them for nothing, as they do once the key sets it NULL."""
    if not has_table(session.connection(), LINK_TABLES[name]):
        return []
    return [linked_row_exists(name, key)]
