"""The link columns' foreign keys, added wherever the linked table exists.

The call log's ``project_id``, ``agent_id``, ``command_id`` and ``turn_id`` refer to tables
that are not the service's: the host's (or the standalone app's). Its migrations may run
before the service's or after, and a host may have no such table at all. So the service's
revisions create the log without these constraints, and every ``upgrade`` of the service's
history ends here: for each link whose table exists and which has no constraint yet, links
to rows that do not exist are set to NULL (logged) and ``FOREIGN KEY ... ON DELETE SET NULL``
is added. A host table created after the service's migration is linked by the next
``inference db upgrade``; until then its ids are still checked before every call.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, column, exists, inspect, table, update

from .models.base import NAMING_CONVENTION
from .models.inference_call import LINK_TABLES
from .models.links import link_table

log = logging.getLogger(__name__)

CALLS = "inference_calls"


def constraint_name(link: str) -> str:
    """The constraint's name, as the naming convention gives it."""
    names = {"table_name": CALLS, "column_0_name": link, "referred_table_name": LINK_TABLES[link]}
    return NAMING_CONVENTION["fk"] % names


def reconcile_links(connection: Connection) -> list[str]:
    """Add the missing link constraints whose tables exist; the links now constrained."""
    inspector = inspect(connection)
    if not inspector.has_table(CALLS):  # the service's history is at base
        return []
    constrained = {
        fk["constrained_columns"][0] for fk in inspector.get_foreign_keys(CALLS) if fk["name"]
    }
    wanted = [
        link
        for link, target in LINK_TABLES.items()
        if link not in constrained and inspector.has_table(target)
    ]
    if not wanted:
        return []
    calls = table(CALLS, *(column(link) for link in wanted))
    for link in wanted:
        target = link_table(link)
        orphaned = connection.execute(
            update(calls)
            .where(calls.c[link].is_not(None), ~exists().where(target.c.id == calls.c[link]))
            .values({link: None})
        ).rowcount
        if orphaned:
            log.warning(
                "call log: %d rows linked to %s ids missing from %s; their %s is now NULL",
                orphaned, link, LINK_TABLES[link], link,
            )  # fmt: skip
    from alembic.operations import Operations  # imported when a migration runs
    from alembic.runtime.migration import MigrationContext

    operations = Operations(MigrationContext.configure(connection))
    # On SQLite one rebuild of the table for every constraint; elsewhere ALTER TABLE.
    with operations.batch_alter_table(CALLS) as batch:
        for link in wanted:
            batch.create_foreign_key(
                constraint_name(link), LINK_TABLES[link], [link], ["id"], ondelete="SET NULL"
            )
    log.info("call log: %s now constrained (ON DELETE SET NULL)", ", ".join(wanted))
    return wanted
