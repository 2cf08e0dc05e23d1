"""The spend guard's database store (inference/budget_database.py) on SQLite and on PostgreSQL
through psycopg 3 and psycopg2: the stores' one contract (tests/budget_contract.py), what is
the database's own (the breaker per process, rows kept a day past their window, amounts past
32 bits, a lock waited for or a database cut off failing as DATABASE_AWAY), and 8 processes
x 4 threads racing one small cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.pool import NullPool
from tests.budget_contract import NOW, BudgetStoreContract, bucket, usd
from tests.drivers import BOTH_DRIVERS, EVERY_DATABASE
from tests.tcp_proxy import TcpProxy

from headspace_inference.calllog.database import DATABASE_AWAY, Database
from headspace_inference.calllog.models import BudgetUse
from headspace_inference.inference.budget_database import KEPT_AFTER_WINDOW, DatabaseBudgetStore
from headspace_inference.inference.budget_store import Bucket, BudgetStore, Storm, Use
from headspace_inference.settings import DatabaseSettings, normalise_url

WORKER = Path(__file__).with_name("budget_worker.py")


@contextmanager
def database_store(url: str, **options: Any) -> Iterator[DatabaseBudgetStore]:
    database = Database(DatabaseSettings(url=url, pool_size=2))
    try:
        yield DatabaseBudgetStore(database, **options)
    finally:
        database.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[DatabaseBudgetStore]:
    with database_store(database_url) as made:
        yield made


@pytest.fixture
def twin(database_url: str) -> Iterator[DatabaseBudgetStore]:
    """Another process's store: its own engine and pool on the same database."""
    with database_store(database_url) as made:
        yield made


def rows(url: str) -> dict[tuple[str, str], tuple[int, int, bool, bool]]:
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    t = BudgetUse.__table__.c  # type: ignore[attr-defined]
    with engine.connect() as conn:
        found = conn.execute(select(t.key, t.part, t.used_usd, t.used_tokens, t.warned, t.capped))
        out = {(r.key, r.part): (r.used_usd, r.used_tokens, r.warned, r.capped) for r in found}
    engine.dispose()
    return out


@EVERY_DATABASE
class TestDatabaseStore(BudgetStoreContract):
    STORM_SHARED = False  # the breaker is per process without Redis


@EVERY_DATABASE
def test_the_breaker_counts_each_process_apart(
    store: BudgetStore, twin: BudgetStore, database_url: str
) -> None:
    storm = Storm("summarise|", calls=2, seconds=60, cooldown=60)
    for i in range(2):
        assert store.reserve([bucket()], usd(0.1), 1, storm, NOW + i).granted
        assert twin.reserve([bucket()], usd(0.1), 1, storm, NOW + i).granted
    assert store.reserve([bucket()], usd(0.1), 1, storm, NOW + 2).storm_tripped
    assert twin.reserve([bucket()], usd(0.1), 1, storm, NOW + 2).storm_tripped
    # Four calls counted, by both processes in the one row; the refused two nowhere.
    assert rows(database_url) == {(bucket().key, ""): (usd(0.4), 4, False, False)}


@EVERY_DATABASE
def test_amounts_past_32_bits_are_counted_exactly(store: BudgetStore) -> None:
    big = bucket(cap_usd=50_000.0, cap_tokens=10**12)
    assert store.reserve([big], usd(3.000000001), 3_000_000_000, None, NOW).granted
    store.adjust([big], usd(20_000), 5_000_000_000, NOW)
    assert store.read(big.key) == {"": Use(usd(20_003.000000001), 8_000_000_000)}


@EVERY_DATABASE
def test_rows_are_kept_a_day_past_their_window_then_deleted(
    store: BudgetStore, database_url: str
) -> None:
    old = bucket("old|hour|1", ends_at=NOW)
    recent = bucket("recent|hour|2", ends_at=NOW + 10)
    for b in (old, recent):
        assert store.reserve([b], usd(0.5), 1, None, NOW - 60).granted
    # A reservation a day and a bit after the old window ended: the old row goes.
    later = NOW + KEPT_AFTER_WINDOW + 1
    assert store.reserve([bucket("new|hour|3", ends_at=later + 3600)], 1, 1, None, later).granted
    assert set(rows(database_url)) == {("recent|hour|2", ""), ("new|hour|3", "")}
    # A late correction of the deleted window adds to nothing, and makes no row.
    assert store.adjust([old], usd(0.1), 1, later) == ()
    assert store.read(old.key) == {}
    assert set(rows(database_url)) == {("recent|hour|2", ""), ("new|hour|3", "")}


@EVERY_DATABASE
def test_the_flags_in_the_row_say_which_alerts_were_given(
    store: BudgetStore, database_url: str
) -> None:
    cap = bucket(cap_usd=1.0, warn_at=0.5)
    assert store.reserve([cap], usd(0.6), 0, None, NOW).alerts == ((0, "warning"),)
    assert rows(database_url)[(cap.key, "")] == (usd(0.6), 0, True, False)
    assert store.reserve([cap], usd(0.6), 0, None, NOW).alerts == ((0, "cap"),)
    assert rows(database_url)[(cap.key, "")] == (usd(0.6), 0, True, True)


@pytest.mark.timeout(60)  # without the lock wait, the store would wait for ever
@BOTH_DRIVERS
def test_a_bucket_locked_past_the_lock_wait_fails_as_the_database_away(
    migrated_postgres_url: str,
) -> None:
    """A caller that holds a bucket's row (cut off mid-transaction, say) holds the others
    back at most the lock wait: then they fail as with the database gone (and fall back)."""
    cap = bucket()
    holder = create_engine(normalise_url(migrated_postgres_url), poolclass=NullPool)
    with database_store(migrated_postgres_url, lock_wait_ms=200) as store:
        assert store.reserve([cap], usd(0.1), 1, None, NOW).granted
        with holder.connect() as conn:
            conn.execute(text("SELECT * FROM inference_budget_use FOR UPDATE"))
            with pytest.raises(DATABASE_AWAY, match="lock timeout"):
                store.reserve([cap], usd(0.1), 1, None, NOW)
            with pytest.raises(DATABASE_AWAY, match="lock timeout"):
                store.adjust([cap], usd(0.1), 1, NOW)
            conn.rollback()
        holder.dispose()
        assert store.reserve([cap], usd(0.1), 1, None, NOW).granted
        assert store.read(cap.key) == {"": Use(usd(0.2), 2)}


@BOTH_DRIVERS
def test_a_caller_stopped_mid_transaction_gives_its_rows_back_within_the_bound(
    migrated_postgres_url: str,
) -> None:
    """A process that stops between two statements of an operation (paused, partitioned)
    holding a bucket's row: past the bound the server ends its session, so the others go on,
    and it is told the database is away (psycopg 3 and psycopg2 say it differently)."""
    cap = bucket()
    engine = create_engine(normalise_url(migrated_postgres_url))
    paused = threading.Event()

    def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE") and not paused.is_set():
            paused.set()  # the row locked, its new use not yet written
            time.sleep(2.0)  # ten times the bound

    event.listen(engine, "before_cursor_execute", pause)
    stopped = DatabaseBudgetStore(Database(DatabaseSettings(), engine=engine), lock_wait_ms=200)
    outcome: list[BaseException] = []

    def stop() -> None:
        try:
            stopped.reserve([cap], usd(0.1), 1, None, NOW)
        except BaseException as exc:
            outcome.append(exc)

    with database_store(migrated_postgres_url) as other:
        assert other.reserve([cap], usd(0.1), 1, None, NOW).granted
        worker = threading.Thread(target=stop)
        worker.start()
        assert paused.wait(timeout=30)
        # Waits for the row until the server ends the stopped session (were it not ended,
        # the stopped reservation would go through when it wakes, and be counted).
        assert other.reserve([cap], usd(0.1), 1, None, NOW).granted
        worker.join()
        assert len(outcome) == 1 and isinstance(outcome[0], DATABASE_AWAY), outcome
        assert other.read(cap.key) == {"": Use(usd(0.2), 2)}
    assert stopped.reserve([cap], usd(0.1), 1, None, NOW).granted  # on a new connection
    engine.dispose()


@BOTH_DRIVERS
def test_a_database_cut_off_fails_every_operation_as_away_until_it_is_back(
    postgres_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, url = postgres_proxy
    cap = bucket()
    with database_store(url) as store:
        _cut_and_back(proxy, store, cap)


def _cut_and_back(proxy: TcpProxy, store: BudgetStore, cap: Bucket) -> None:
    assert store.reserve([cap], usd(0.25), 10, None, NOW).granted
    proxy.cut()
    with pytest.raises(DATABASE_AWAY):
        store.reserve([cap], usd(0.25), 10, None, NOW)
    with pytest.raises(DATABASE_AWAY):
        store.adjust([cap], -usd(0.1), -5, NOW)
    with pytest.raises(DATABASE_AWAY):
        store.read(cap.key)
    proxy.restore()
    assert store.read(cap.key) == {"": Use(usd(0.25), 10)}  # nothing half-counted
    assert store.reserve([cap], usd(0.25), 10, None, NOW).granted
    assert store.read(cap.key) == {"": Use(usd(0.5), 20)}


# --------------------------------------------------------------------------- the race

PROCESSES, THREADS, ATTEMPTS = 8, 4, 30
# The cap holds 100 worst cases; 960 attempts each reserve one worst case and correct it to
# between nothing and all of it (about half): some 200 are granted before the cap is full.
CAP_USD, WORST_USD, WORST_TOKENS = 1.0, 0.01, 1000


def race(url: str) -> dict[str, Any]:
    start_at = time.time() + 3.0  # every process started
    spec = json.dumps({"url": url, "start_at": start_at, "threads": THREADS,
                       "attempts": ATTEMPTS, "cap_usd": CAP_USD, "worst_usd": WORST_USD,
                       "worst_tokens": WORST_TOKENS})  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        for i in range(PROCESSES)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return {"results": results, "rows": rows(url)}


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_processes_racing_one_small_cap_never_cross_it(database_url: str) -> None:
    outcome = race(database_url)
    results, found = outcome["results"], outcome["rows"]
    cap = usd(CAP_USD)
    granted = sum(r["granted"] for r in results)
    refused = sum(r["refused"] for r in results)
    real_usd = sum(r["real_usd"] for r in results)
    real_tokens = sum(r["real_tokens"] for r in results)
    highest = max(r["highest_use"] for r in results)
    seconds = max(r["seconds"] for r in results)
    print(
        f"\nBUDGET RACE {database_url.split(':')[0]}: {PROCESSES} processes x {THREADS}"
        f" threads, {granted} granted, {refused} refused in {seconds:.2f} s;"
        f" highest use {highest / 1e9:.4f} of cap {CAP_USD} USD;"
        f" final {found[('race|day|0', '')][0] / 1e9:.9f} USD ="
        f" the real costs {real_usd / 1e9:.9f} USD"
    )
    # No reservation took the use past the cap, and what was spent stayed within it.
    assert highest <= cap
    assert real_usd <= cap
    # Every reservation was corrected to its real cost, nothing lost between processes:
    # the one bucket, and each process's own part of the other.
    assert found[("race|day|0", "")][:2] == (real_usd, real_tokens)
    for r in results:
        assert found[("race-each|day|0", str(r["index"]))][:2] == (r["real_usd"], r["real_tokens"])
    # The cap was contested: filled, given back by the corrections and filled again.
    assert granted + refused == PROCESSES * THREADS * ATTEMPTS
    assert granted > cap // usd(WORST_USD) and refused > 0
