"""The standalone app's database: its own domain history, then the service's.

``alembic_version`` keeps the app's own history (as a host's would), and the service keeps
its own in ``alembic_version_inference``, exactly as inside a host.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, column, inspect, select, table, text, update

from ..calllog.database import SERVICE_HISTORY, SERVICE_VERSION_TABLE, Database, History, is_sqlite
from ..settings import DatabaseSettings, normalise_url
from .models import Base

log = logging.getLogger(__name__)

APP_VERSION_TABLE = "alembic_version"
# The one history the service had before it kept its own: revision 0001 made every table
# (the domain's, the call log with its link constraints, the rollup); 0002 turned the
# rollup's money on SQLite into integer picodollars.
COMBINED_REVISIONS = ("0001", "0002")


def adopt_combined_history(connection: Connection) -> None:
    """Move a database made by the combined history onto the two histories, in place.

    Its tables are exactly what a0001 and i0001 make, with the links constrained as the
    service's upgrade constrains them (tests/integration/test_migrations.py compares the
    two): so nothing is migrated, only the versions are written where they now live.
    """
    inspector = inspect(connection)
    if not inspector.has_table(APP_VERSION_TABLE) or inspector.has_table(SERVICE_VERSION_TABLE):
        return
    versions = table(APP_VERSION_TABLE, column("version_num"))
    version = connection.execute(select(versions.c.version_num)).scalar()
    if version not in COMBINED_REVISIONS:
        return
    if version == "0001" and connection.dialect.name == "sqlite":
        # What 0002 did: dollars (a float on SQLite) to integer picodollars.
        connection.execute(
            text(
                "UPDATE inference_usage_rollup SET"
                " cost_usd = CAST(ROUND(cost_usd * 1e12) AS INTEGER),"
                " saved_cost_usd = CAST(ROUND(saved_cost_usd * 1e12) AS INTEGER),"
                " upstream_cost_usd = CAST(ROUND(upstream_cost_usd * 1e12) AS INTEGER)"
            )
        )
    connection.execute(update(versions).values(version_num="a0001"))
    service = MigrationContext.configure(connection, opts={"version_table": SERVICE_VERSION_TABLE})
    service.stamp(SERVICE_HISTORY.script_directory, "i0001")
    log.info("database: combined history %s adopted as app a0001 + inference i0001", version)


APP_HISTORY = History(
    "app",
    Path(__file__).parent / "migrations",
    APP_VERSION_TABLE,
    Base.metadata,
    prepare=adopt_combined_history,
)
HISTORIES = (APP_HISTORY, SERVICE_HISTORY)


def standalone_database(settings: DatabaseSettings) -> Database:
    """The standalone app's database: its domain history, then the service's. An SQLite
    one (embedded, the app's own) is always migrated at start-up; another only with
    ``database.auto_migrate``."""
    if not settings.auto_migrate and is_sqlite(normalise_url(settings.url)):
        settings = settings.model_copy(update={"auto_migrate": True})
    return Database(settings, histories=HISTORIES)
