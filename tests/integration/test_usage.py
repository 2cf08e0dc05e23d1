"""Usage aggregates: the rollup (hour and day rows plus raw edges) and the raw rows agree
exactly, on SQLite and PostgreSQL, however rows are batched, written concurrently or windowed."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, text
from tests.call_rows import call, write
from tests.drivers import EVERY_DATABASE

from headspace_inference.calllog.database import Database
from headspace_inference.calllog.models import InferenceCall, UsageRollup
from headspace_inference.calllog.models.inference_call import LATENCY_BUCKETS_MS
from headspace_inference.calllog.record import CallRecord
from headspace_inference.calllog.rollup import latency_bucket, rollup_disagreements
from headspace_inference.operate.usage import (
    UsageQuery,
    compute_usage,
    compute_usage_raw,
    usage_report,
    usage_report_raw,
)
from headspace_inference.settings import DatabaseSettings
from headspace_inference.standalone.database import standalone_database

T0 = datetime(2026, 10, 31, 21, 0, tzinfo=UTC)  # three hours before a day boundary
SPREAD_MINUTES = 3 * 24 * 60  # rows over three days: day rows, hour rows and raw edges
MODELS = ["anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5", "acme/unpriced"]
PICO = Decimal(10) ** -12


def clear(db: Database) -> None:
    with db.sessions() as session:
        session.execute(delete(InferenceCall))
        session.execute(delete(UsageRollup))
        session.commit()


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = standalone_database(DatabaseSettings(url=database_url, pool_size=8))
    with db.engine.begin() as conn:
        for pid in (1, 2, 3):
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:i, :n, :t)"),
                {"i": pid, "n": f"p{pid}", "t": datetime(2026, 1, 1)},
            )
    yield db
    db.dispose()


# --------------------------------------------------------------------------- strategies

money = st.one_of(
    st.none(),
    st.integers(0, 10**10).map(lambda n: n * PICO),  # up to a cent, twelve decimals
    st.integers(0, 500 * 10**12).map(lambda n: n * PICO),  # large: sums beyond a float
)

row_strategy = st.builds(
    lambda minute, second, level, model, project, status, tin, tout, latency, c, s, u: call(
        T0 + timedelta(minutes=minute, seconds=second),
        level=level,
        model=model,
        status=status,
        project_id=project,
        input_tokens=tin,
        output_tokens=tout,
        latency_ms=latency,
        cost=c if status == "ok" else None,
        saved=s,
        upstream=u,
    ),
    st.integers(0, SPREAD_MINUTES),
    st.integers(0, 59),
    st.sampled_from(["turn", "task", "project", "objective"]),
    st.sampled_from(MODELS),
    st.sampled_from([None, 1, 2]),
    st.sampled_from(["ok", "ok", "ok", "cached", "error", "rate_limited", "refused", "cancelled"]),
    st.integers(0, 50_000),
    st.integers(0, 4_000),
    # Bucket bounds themselves and their neighbours, and everything up to past the last one.
    st.one_of(
        st.sampled_from([b + d for b in LATENCY_BUCKETS_MS for d in (-1, 0, 1)]),
        st.integers(0, 90_000),
    ),
    money,
    money,
    money,
)

edge = st.one_of(
    st.none(),
    # Minutes and seconds: edges on exact hours, exact days and anywhere in between.
    st.builds(
        lambda m, s: T0 + timedelta(minutes=m, seconds=s),
        st.integers(-90, SPREAD_MINUTES + 90),
        st.sampled_from([0, 0, 1, 59, 30]),
    ),
    st.builds(lambda h: T0 + timedelta(hours=h), st.integers(-2, 3 * 24 + 2)),
)

query_strategy = st.builds(
    lambda a, b, level, model, project: UsageQuery(
        since=min(a, b) if a and b else a,
        until=max(a, b) if a and b else b,
        level=level,
        model=model,
        project_id=project,
    ),
    edge,
    edge,
    st.one_of(st.none(), st.sampled_from(["turn", "project"])),
    st.one_of(st.none(), st.sampled_from(MODELS[:2])),
    st.one_of(st.none(), st.sampled_from([1, 2, 3])),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(row_strategy, max_size=80),
    batch=st.integers(1, 30),
    queries=st.lists(query_strategy, min_size=1, max_size=8),
)
def test_rollup_and_raw_rows_agree_exactly(
    database: Database, rows: list[CallRecord], batch: int, queries: list[UsageQuery]
) -> None:
    clear(database)
    write(database.sessions, rows, batch)
    with database.sessions() as session:
        for q in [UsageQuery(), *queries]:
            assert (
                compute_usage(session, q).comparable() == compute_usage_raw(session, q).comparable()
            )
            assert usage_report(session, q) == usage_report_raw(session, q)
        everything = compute_usage(session, UsageQuery())
    # And both equal the sums taken in Python, exactly.
    totals: dict[str, object] = {"calls": 0, "cached_calls": 0, "error_calls": 0}
    for sums in everything.groups.values():
        for name in totals:
            totals[name] = int(totals[name]) + sums.ints[name]  # type: ignore[call-overload]
    assert totals == {
        "calls": len(rows),
        "cached_calls": sum(r.status == "cached" for r in rows),
        "error_calls": sum(r.status not in ("ok", "cached") for r in rows),
    }
    for name in ("cost_usd", "saved_cost_usd", "upstream_cost_usd"):
        got = sum((s.money[name] for s in everything.groups.values()), Decimal(0))
        assert got == sum((getattr(r, name) or Decimal(0) for r in rows), Decimal(0))
    upstream_tokens = sum(r.input_tokens for r in rows if r.status != "cached")
    assert sum(s.ints["input_tokens"] for s in everything.groups.values()) == upstream_tokens


@EVERY_DATABASE
def test_known_rows(database: Database) -> None:
    rows = [
        call(T0 + timedelta(minutes=5), cost=Decimal("0.0002"), project_id=1, latency_ms=5,
             input_tokens=100, output_tokens=20),
        call(T0 + timedelta(minutes=65), status="cached", saved=Decimal("0.0002"),
             input_tokens=100, output_tokens=20, latency_ms=6),
        call(T0 + timedelta(minutes=70), level="project", model=MODELS[1], status="error",
             input_tokens=0, output_tokens=0, latency_ms=900),
    ]  # fmt: skip
    write(database.sessions, rows, 2)
    with database.sessions() as session:
        report = usage_report(session, UsageQuery())
        windowed = usage_report(session, UsageQuery(since=T0 + timedelta(minutes=30)))
        turn_only = usage_report(session, UsageQuery(level="turn", project_id=1))
    assert report["total_calls"] == 3
    assert report["calls_by_level"] == {"project": 1, "turn": 2}
    assert report["calls_by_model"] == {MODELS[0]: 2, MODELS[1]: 1}
    # A cache hit's tokens were not sent upstream: they are not counted again.
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (100, 20)
    tokens = {"input": 100, "output": 20, "cached_input": 0, "cache_write": 0, "reasoning": 0}
    assert report["tokens_by_level"]["turn"] == tokens
    assert report["total_cost"] == 0.0002
    assert report["cost_by_model"] == {MODELS[0]: 0.0002, MODELS[1]: 0.0}
    assert report["cost_by_level"] == {"project": 0.0, "turn": 0.0002}
    assert (report["cache_hits"], report["saved_cost"], report["errors"]) == (1, 0.0002, 1)
    assert report["latency_ms"]["turn"] == {"mean": 5.5, "p50": 5, "p90": 10, "p99": 10}
    assert report["latency_ms"]["project"]["p50"] == 1000
    assert report["window"] == {"since": None, "until": None}
    assert windowed["total_calls"] == 2
    assert windowed["window"]["since"] == "2026-10-31T21:30:00+00:00"
    assert turn_only["total_calls"] == 1
    assert turn_only["filters"] == {"level": "turn", "model": None, "project_id": 1}


def test_latency_buckets_and_percentiles_past_the_last_bound(database: Database) -> None:
    assert [latency_bucket(v) for v in (0, 5, 6, 10, 11, 60_000, 60_001)] == [0, 0, 1, 1, 2, 12, 13]
    write(database.sessions, [call(T0, latency_ms=70_000) for _ in range(3)], 3)
    with database.sessions() as session:
        latency = usage_report(session, UsageQuery())["latency_ms"]["turn"]
    # Past the last bound (60 s) a percentile is unknown: null, with the mean still exact.
    assert latency == {"mean": 70_000.0, "p50": None, "p90": None, "p99": None}


def test_long_windows_use_day_rows_and_agree(database: Database) -> None:
    # One call every 20 minutes for 40 days: a window over all of it reads day rows.
    rows = [call(T0 + timedelta(minutes=20 * i), cost=Decimal("0.001")) for i in range(40 * 72)]
    write(database.sessions, rows, 500)
    with database.sessions() as session:
        days = session.scalar(select(UsageRollup.id).where(UsageRollup.span == "day").limit(1))
        assert days is not None
        q = UsageQuery(
            since=T0 + timedelta(days=1, minutes=7), until=T0 + timedelta(days=38, minutes=50)
        )
        assert usage_report(session, q) == usage_report_raw(session, q)
        assert usage_report(session, UsageQuery())["total_cost"] == pytest.approx(2.88)


@EVERY_DATABASE
def test_large_sums_stay_exact(database: Database) -> None:
    # 3,000 calls in one hour, amounts with twelve random decimals summing to about $15,000:
    # past what a float carries to the picodollar (SQLite's NUMERIC is a float).
    rnd = random.Random(7)
    amounts = [Decimal(rnd.randrange(10 * 10**12)) * PICO for _ in range(3000)]
    write(
        database.sessions,
        [call(T0 + timedelta(seconds=i), cost=a) for i, a in enumerate(amounts)],
        400,
    )
    with database.sessions() as session:
        rollup = compute_usage(session, UsageQuery()).groups[("turn", MODELS[0])]
        raw = compute_usage_raw(session, UsageQuery()).groups[("turn", MODELS[0])]
    assert rollup.money["cost_usd"] == raw.money["cost_usd"] == sum(amounts)


@EVERY_DATABASE
def test_concurrent_writers_lose_no_update(database: Database) -> None:
    # Four writers on their own connections, all adding to the same few buckets at once.
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            start.wait()
            rows = [
                call(T0 + timedelta(minutes=rnd.randrange(120)),
                     level=rnd.choice(["turn", "task"]), project_id=rnd.choice([None, 1]),
                     cost=Decimal(rnd.randrange(10**9)) * PICO)
                for _ in range(15 * 8)
            ]  # fmt: skip
            write(database.sessions, rows, 8)  # fifteen transactions of eight
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with database.sessions() as session:
        assert session.scalar(select(InferenceCall.id).order_by(InferenceCall.id.desc()).limit(1))
        rollup = compute_usage(session, UsageQuery())
        assert rollup.comparable() == compute_usage_raw(session, UsageQuery()).comparable()
        assert sum(s.ints["calls"] for s in rollup.groups.values()) == 4 * 15 * 8


@EVERY_DATABASE
def test_a_deleted_projects_usage_agrees_with_its_rows(database: Database) -> None:
    # Deleting a project sets its calls' project_id to NULL; usage filtered by its id must
    # then answer what the raw rows say (nothing), and the totals must not change.
    rows = [call(T0 + timedelta(minutes=m), project_id=p, cost=Decimal("0.001"))
            for m, p in ((5, 1), (50, 1), (70, 2), (24 * 60 + 5, 1))]  # fmt: skip
    write(database.sessions, rows, 4)
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM projects WHERE id = 1"))
    with database.sessions() as session:
        assert session.scalar(select(func.count()).where(InferenceCall.project_id == 1)) == 0
        for q in (
            UsageQuery(project_id=1),
            UsageQuery(project_id=2),
            UsageQuery(),
            UsageQuery(project_id=1, since=T0 + timedelta(minutes=30)),
        ):
            assert usage_report(session, q) == usage_report_raw(session, q)
        assert usage_report(session, UsageQuery(project_id=1))["total_calls"] == 0
        assert usage_report(session, UsageQuery(project_id=2))["total_calls"] == 1
        assert usage_report(session, UsageQuery())["total_calls"] == 4
        # `usage --check` compares what is read: the rollup still agrees with the rows.
        assert rollup_disagreements(session) == []
