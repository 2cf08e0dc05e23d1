"""What checking a call's link costs: the first check of an id (a query; the first of all
also asks whether the host's table exists) and an id already seen (remembered), on SQLite
and on PostgreSQL. Run: python -m bench.bench_links [POSTGRES_URL]"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid

from sqlalchemy import create_engine, text

from headspace_inference.inference.types import CallLinks
from headspace_inference.inference.validation import LinkChecker
from headspace_inference.settings import DatabaseSettings
from headspace_inference.standalone.database import standalone_database

IDS = 1000


def measure(url: str) -> tuple[str, float, float]:
    """(dialect, µs for an id's first check, µs for an id seen before)."""
    database = standalone_database(DatabaseSettings(url=url))
    database.upgrade()
    with database.engine.begin() as conn:
        for start in range(1, IDS + 1, 500):
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:i, :n, '2026-01-01')"),
                [{"i": i, "n": f"p{i}"} for i in range(start, min(start + 500, IDS + 1))],
            )
    checker = LinkChecker(database.sessions)
    timings = []
    for _ in range(2):  # first checks, then the same ids again
        start = time.perf_counter()
        for i in range(1, IDS + 1):
            checker.check(CallLinks(i, None, None, None))
        timings.append((time.perf_counter() - start) / IDS * 1e6)
    dialect = database.engine.dialect.name
    database.dispose()
    return dialect, timings[0], timings[1]


def main() -> None:
    urls = []
    with tempfile.TemporaryDirectory() as tmp:
        urls.append(f"sqlite:///{tmp}/links.db")
        admin = None
        if len(sys.argv) > 1:
            base = sys.argv[1].replace("postgresql://", "postgresql+psycopg://", 1)
            name = f"hs_links_{uuid.uuid4().hex[:8]}"
            admin = create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
            urls.append(base.rsplit("/", 1)[0] + "/" + name)
        try:
            for url in urls:
                dialect, first, again = measure(url)
                print(f"{dialect}: first check of an id {first:.0f} us, an id seen before "
                      f"{again:.1f} us")  # fmt: skip
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                admin.dispose()


if __name__ == "__main__":
    main()
