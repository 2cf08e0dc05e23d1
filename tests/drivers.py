"""Running a test on each PostgreSQL driver the service supports: psycopg 3 (the
``postgres`` extra) and psycopg2 (what a host such as Claude Headspace already has).

Only the tests that touch the driver run on both (the writer's COPY and its fallbacks,
journal replay, migrations, the usage rollup, deletes), so the suite's time is not doubled.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from headspace_inference.settings import normalise_url

POSTGRES_DRIVERS = ("psycopg", "psycopg2")

# For a test on ``postgres_url`` / ``migrated_postgres_url`` / ``postgres_proxy``.
BOTH_DRIVERS = pytest.mark.parametrize("pg_driver", POSTGRES_DRIVERS)

# For a test on ``database_url``: SQLite, PostgreSQL on psycopg 3, PostgreSQL on psycopg2.
EVERY_DATABASE = pytest.mark.parametrize(
    "database_url", ["sqlite", "postgres", "postgres+psycopg2"], indirect=True
)


def on_driver(url: str, driver: str) -> str:
    """The same PostgreSQL database through ``driver`` (``postgresql+DRIVER://``)."""
    parsed = make_url(normalise_url(url)).set(drivername=f"postgresql+{driver}")
    return parsed.render_as_string(hide_password=False)
