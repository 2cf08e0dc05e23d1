"""/api/inference/usage at a million calls and more, on PostgreSQL: rollup vs raw aggregates.

    .venv/bin/python bench/bench_usage.py --rows 1000000 3000000

Fills a fresh database (dropped afterwards) with call rows spread over 90 days, generated
inside PostgreSQL (generate_series: no 3M-row round trip through Python on a shared
machine), builds the hour and day rollup with one INSERT ... SELECT ... GROUP BY a span
(checked: equal to what apply_rollup writes for a sample day's calls, and equal to the raw
aggregates), then times GET /api/inference/usage over all time through the Flask test client
and usage_report_raw (the same numbers from raw rows only). Prints medians and ratios;
--json prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.common import postgres_database
from headspace_inference.calllog.models.inference_call import LATENCY_BUCKETS_MS

DAYS = 90


def fill(engine: Engine, start: int, stop: int, total: int) -> None:
    """Rows start..stop-1 of ``total``, spread evenly over DAYS days, generated in the server."""
    seconds_per_row = DAYS * 86400 / total
    with engine.begin() as conn:
        conn.execute(
            text("""
            INSERT INTO inference_calls (request_id, timestamp, level, purpose, model, status,
                input_tokens, output_tokens, input_hash, latency_ms, cost_usd, saved_cost_usd,
                upstream_cost_usd, cached, attempts, project_id)
            SELECT md5('row' || g),
                timestamp '2026-08-01' + g * CAST(:spr AS double precision) * interval '1 second',
                (array['turn','task','project','objective'])[1 + g % 4], 'bench',
                CASE WHEN g % 4 < 2 THEN 'anthropic/claude-haiku-4.5'
                     ELSE 'anthropic/claude-sonnet-4.5' END,
                CASE WHEN g % 10 = 0 THEN 'cached' WHEN g % 37 = 0 THEN 'error' ELSE 'ok' END,
                100 + g % 900, 20 + g % 300, md5('in' || (g % 5000)), 20 + g % 3000,
                CASE WHEN g % 10 = 0 THEN 0 WHEN g % 37 = 0 THEN NULL
                     ELSE (100 + g % 900) * 0.000001 + (20 + g % 300) * 0.000005 END,
                CASE WHEN g % 10 = 0 THEN 0.0004 END,
                CASE WHEN g % 10 <> 0 AND g % 37 <> 0 THEN 0.0003 END,
                g % 10 = 0, 1, NULL
            FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS g
            """),
            {"spr": seconds_per_row, "a": start, "b": stop - 1},
        )


def build_rollup(engine: Engine) -> None:
    """The rollup of every row, one statement a span (what apply_rollup keeps call by call)."""
    lower = [None, *LATENCY_BUCKETS_MS]
    upper = [*LATENCY_BUCKETS_MS, None]
    buckets = []
    for lo, hi in zip(lower, upper, strict=True):
        cond = " AND ".join(
            c for c in (f"latency_ms > {lo}" if lo is not None else "",
                        f"latency_ms <= {hi}" if hi is not None else "") if c
        )  # fmt: skip
        buckets.append(f"sum(CASE WHEN {cond} THEN 1 ELSE 0 END)")
    hist_cols = ", ".join(f"lat_{i:02d}" for i in range(len(buckets)))
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE inference_usage_rollup"))
        for span in ("hour", "day"):
            conn.execute(
                text(f"""
                INSERT INTO inference_usage_rollup (span, bucket_start, level, model,
                    project_key, calls, cached_calls, error_calls, input_tokens, output_tokens,
                    cached_input_tokens, cache_write_tokens, reasoning_tokens,
                    cost_usd, saved_cost_usd, upstream_cost_usd, cache_discount_usd,
                    compared_cost_usd, compared_upstream_cost_usd, latency_ms_sum, {hist_cols})
                SELECT '{span}', date_trunc('{span}', timestamp), level, model,
                    coalesce(project_id, 0), count(*),
                    sum(CASE WHEN status = 'cached' THEN 1 ELSE 0 END),
                    sum(CASE WHEN status NOT IN ('ok', 'cached') THEN 1 ELSE 0 END),
                    sum(CASE WHEN status <> 'cached' THEN input_tokens ELSE 0 END),
                    sum(CASE WHEN status <> 'cached' THEN output_tokens ELSE 0 END),
                    sum(CASE WHEN status <> 'cached' THEN cached_input_tokens ELSE 0 END),
                    sum(CASE WHEN status <> 'cached' THEN cache_write_tokens ELSE 0 END),
                    sum(CASE WHEN status <> 'cached' THEN reasoning_tokens ELSE 0 END),
                    coalesce(sum(cost_usd), 0), coalesce(sum(saved_cost_usd), 0),
                    coalesce(sum(upstream_cost_usd), 0), coalesce(sum(cache_discount_usd), 0),
                    coalesce(sum(CASE WHEN upstream_cost_usd IS NOT NULL THEN cost_usd END), 0),
                    coalesce(sum(CASE WHEN cost_usd IS NOT NULL THEN upstream_cost_usd END), 0),
                    sum(latency_ms), {", ".join(buckets)}
                FROM inference_calls GROUP BY 2, 3, 4, 5
                """)
            )
        conn.execute(text("ANALYZE"))


def same_as_apply_rollup(database: Any, day: datetime) -> bool:
    """Whether the bulk-built rollup rows of ``day`` (its day row and its 24 hour rows) equal
    what apply_rollup writes for that day's calls: both are read, then apply_rollup rebuilds
    them from the raw rows in a transaction that is rolled back."""
    from sqlalchemy import delete, select

    from headspace_inference.calllog.models import InferenceCall, UsageRollup
    from headspace_inference.calllog.rollup import apply_rollup

    end = day + timedelta(days=1)
    r = UsageRollup
    in_day = r.bucket_start.between(day, end - timedelta(hours=1))
    columns = [c for c in r.__table__.columns if c.name != "id"]

    def read(session: Any) -> list[tuple[Any, ...]]:
        stmt = select(*columns).where(in_day).order_by(r.span, r.bucket_start, r.level, r.model)
        return [tuple(row) for row in session.execute(stmt)]

    with database.sessions() as session:
        bulk = read(session)
        calls = session.scalars(
            select(InferenceCall).where(
                InferenceCall.timestamp >= day, InferenceCall.timestamp < end
            )
        ).all()
        session.execute(delete(r).where(in_day))
        apply_rollup(session, calls)
        incremental = read(session)
        session.rollback()
    return bool(bulk) and bulk == incremental


def median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from headspace_inference import create_app
    from headspace_inference.operate.usage import (
        UsageQuery,
        compute_usage,
        compute_usage_raw,
        usage_report_raw,
    )

    results: dict[str, Any] = {"rows": {}}
    with postgres_database() as url:
        with tempfile.TemporaryDirectory() as spool:
            app = create_app(
                overrides={
                    "database": {"url": url, "auto_migrate": True},
                    "openrouter": {"api_key": None},
                    "inference": {"spool_path": spool},
                }
            )
            client = app.test_client()
            database = app.extensions["inference"].database
            engine = database.engine
            for total in sorted(args.rows):
                # Each size starts from an empty table, so its rows cover the same DAYS days.
                with engine.begin() as conn:
                    conn.execute(text("TRUNCATE inference_calls"))
                fill(engine, 1, total + 1, total)
                build_rollup(engine)
                with database.sessions() as session:
                    day = UsageQuery(
                        since=datetime.fromisoformat("2026-09-01T10:17:00+00:00"),
                        until=datetime.fromisoformat("2026-09-02T13:45:00+00:00"),
                    )
                    same = (
                        compute_usage(session, day).comparable()
                        == compute_usage_raw(session, day).comparable()
                    )
                    rollup_rows = session.execute(
                        text("SELECT count(*) FROM inference_usage_rollup")
                    ).scalar()
                sample = same_as_apply_rollup(
                    database, datetime.fromisoformat("2026-09-15T00:00:00+00:00")
                )
                client.get("/api/inference/usage")  # warm
                usage_ms = median_ms(lambda: client.get("/api/inference/usage").json, 50)

                def raw() -> None:
                    with database.sessions() as session:
                        usage_report_raw(session, UsageQuery())

                raw_ms = median_ms(raw, 5)
                with database.sessions() as session:
                    agree = (
                        compute_usage(session, UsageQuery()).comparable()
                        == compute_usage_raw(session, UsageQuery()).comparable()
                    )
                results["rows"][str(total)] = {
                    "usage_endpoint_median_ms": round(usage_ms, 2),
                    "raw_aggregates_median_ms": round(raw_ms, 1),
                    "speedup": round(raw_ms / usage_ms, 1),
                    "rollup_rows": rollup_rows,
                    "rollup_equals_raw_all_time": agree,
                    "rollup_equals_raw_partial_window": same,
                    "bulk_rollup_equals_apply_rollup_sample_day": sample,
                }
                if not args.json:
                    print(
                        f"{total:>9} rows: /usage {usage_ms:6.2f} ms (median of 50), raw "
                        f"aggregates {raw_ms:8.1f} ms (median of 5), {raw_ms / usage_ms:6.1f}x; "
                        f"rollup rows {rollup_rows}; equal: {agree and same}; "
                        f"bulk rollup = apply_rollup on a sample day: {sample}",
                        flush=True,
                    )
            app.extensions["inference"].close()
            database.dispose()
        sizes = sorted(results["rows"], key=int)
        if len(sizes) > 1:
            first, last = results["rows"][sizes[0]], results["rows"][sizes[-1]]
            results["growth"] = round(
                last["usage_endpoint_median_ms"] / first["usage_endpoint_median_ms"], 2
            )
    print(json.dumps(results) if args.json else f"growth {results.get('growth')}x", flush=True)


if __name__ == "__main__":
    main()
