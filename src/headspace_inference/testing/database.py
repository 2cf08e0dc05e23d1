"""The service's tables in a test database that a host builds with ``metadata.create_all``
rather than with migrations."""

from __future__ import annotations

from sqlalchemy import Column, Connection, Engine, MetaData, String, Table

from ..calllog.database import SERVICE_HISTORY, SERVICE_VERSION_TABLE
from ..calllog.link_keys import reconcile_links
from ..calllog.models import Base

__all__ = ["create_tables", "drop_tables"]


def create_tables(bind: Engine | Connection) -> None:
    """Create the service's tables as its migrations would, and stamp its version table
    (``alembic_version_inference``) at head, so a service started on this database neither
    warns that it is behind nor migrates.

    The tables come from the service's models (which its migrations match), then, as at the
    end of every upgrade, the link columns get their foreign keys to whichever of the host's
    ``projects``, ``agents``, ``commands``, ``turns`` exist: so call this after the host's
    own ``create_all``. Tables already there are kept. A database whose service history is
    at another revision is refused (ValueError): migrate it instead. On an Engine this runs
    in a transaction of its own; on a Connection, in the connection's (commit it, as with
    ``metadata.create_all(connection)``). The host's own tables and ``alembic_version`` are
    never touched.
    """
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            _create(connection)
    else:
        _create(bind)


def drop_tables(bind: Engine | Connection) -> None:
    """Drop the service's tables and its version table (those present), leaving the
    host's. Call it before the host's ``drop_all``: the call log's foreign keys point at the
    host's tables. Transactions as for create_tables()."""
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            _drop(connection)
    else:
        _drop(bind)


def _version_table() -> Table:
    return Table(SERVICE_VERSION_TABLE, MetaData(), Column("version_num", String(32)))


def _create(connection: Connection) -> None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": SERVICE_VERSION_TABLE})
    current, head = context.get_current_revision(), SERVICE_HISTORY.head()
    if current not in (None, head):
        raise ValueError(
            f"the database's {SERVICE_VERSION_TABLE} is at {current}, not the service's head "
            f"{head}: run `flask inference db upgrade` on it rather than create_tables()"
        )
    Base.metadata.create_all(connection)
    reconcile_links(connection)
    if current is None:
        context.stamp(SERVICE_HISTORY.script_directory, "head")


def _drop(connection: Connection) -> None:
    Base.metadata.drop_all(connection)
    _version_table().drop(connection, checkfirst=True)
