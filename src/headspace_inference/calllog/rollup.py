"""The hourly and daily usage rollup, written beside the call log.

Every call is counted in ``inference_usage_rollup`` twice: in its hour and in its day, in
the same transaction as the rows it sums, so both always agree, exactly:

- counts, tokens and latency sums are integers;
- money is summed exactly: PostgreSQL sums NUMERIC; SQLite, which has no decimal type,
  keeps the rollup's money as integer picodollars (``RollupMoney``) and sums a call's
  float amount rounded to integer picodollars (every amount has at most twelve decimals),
  exact up to $9.2 million a sum (SQLite's 64-bit integers);
- latency percentiles come from a fixed histogram (``LATENCY_BUCKETS_MS``) that the raw
  computation builds the same way, so a percentile is the upper bound of its bucket.

Token totals count what was sent upstream: a cache hit's tokens are not counted again
(its row carries them for the record, and ``saved_cost`` says what it saved). Calls are
grouped by the model that answered (a fallback, when the primary failed). The queries
that read it are operate/usage.py's.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .batches import in_id_order
from .models import InferenceCall, UsageRollup
from .models.inference_call import LATENCY_BUCKETS_MS

HIST = [f"lat_{i:02d}" for i in range(len(LATENCY_BUCKETS_MS) + 1)]
# A row's amounts; then the rollup's like-for-like sums over rows with both costs.
ROW_MONEY = ("cost_usd", "saved_cost_usd", "upstream_cost_usd", "cache_discount_usd")
MONEY_FIELDS = (*ROW_MONEY, "compared_cost_usd", "compared_upstream_cost_usd")
# The token kinds a row carries, summed for calls that went upstream.
TOKEN_FIELDS = (
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
    "reasoning_tokens",
)  # fmt: skip
INT_FIELDS = ("calls", "cached_calls", "error_calls", *TOKEN_FIELDS, "latency_ms_sum", *HIST)
# Our estimate and OpenRouter's figure disagree when they differ by more than this share.
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def latency_bucket(latency_ms: int) -> int:
    """The histogram bucket of a latency."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def hour_floor(moment: datetime) -> datetime:
    """The start of the hour ``moment`` falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_floor(moment: datetime) -> datetime:
    """The start of the (UTC) day ``moment`` falls in."""
    return hour_floor(moment).replace(hour=0)


def ceil_to(moment: datetime, floor: Any, step: timedelta) -> datetime:
    start: datetime = floor(moment)
    return start if start == moment else start + step


# --------------------------------------------------------------------------- writing


@dataclass
class Sums:
    ints: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INT_FIELDS, 0))
    money: dict[str, Decimal] = field(
        default_factory=lambda: dict.fromkeys(MONEY_FIELDS, Decimal(0))
    )

    def merge(self, other: Sums) -> None:
        """Add another bucket's sums to these."""
        for name, value in other.ints.items():
            self.ints[name] += value
        for name, amount in other.money.items():
            self.money[name] += amount

    def negate(self) -> None:
        """These sums, subtracted instead of added."""
        self.ints = {name: -value for name, value in self.ints.items()}
        self.money = {name: -amount for name, amount in self.money.items()}

    def add(self, call: Any) -> None:
        ints = self.ints
        ints["calls"] += 1
        if call.status == "cached":
            ints["cached_calls"] += 1
        else:
            for name in TOKEN_FIELDS:
                ints[name] += getattr(call, name) or 0
        if call.status not in ("ok", "cached"):
            ints["error_calls"] += 1
        latency = call.latency_ms or 0
        ints["latency_ms_sum"] += latency
        ints[HIST[latency_bucket(latency)]] += 1
        money = self.money
        for name in ROW_MONEY:
            value = getattr(call, name)
            if value is not None:
                money[name] += Decimal(value)
        if call.cost_usd is not None and call.upstream_cost_usd is not None:
            money["compared_cost_usd"] += Decimal(call.cost_usd)
            money["compared_upstream_cost_usd"] += Decimal(call.upstream_cost_usd)


_Key = tuple[str, datetime, str, str, int]


def _buckets(calls: Sequence[Any]) -> dict[_Key, Sums]:
    hours: dict[_Key, Sums] = {}
    for call in calls:
        key = ("hour", hour_floor(call.timestamp), call.level, call.model, call.project_id or 0)
        sums = hours.get(key)
        if sums is None:
            sums = hours[key] = Sums()
        sums.add(call)
    # Each call is counted in its day too: add up its hour buckets rather than the calls.
    buckets = dict(hours)
    for (_, hour, level, model, project), sums in hours.items():
        day_key = ("day", day_floor(hour), level, model, project)
        day = buckets.get(day_key)
        if day is None:
            day = buckets[day_key] = Sums()
        day.merge(sums)
    return buckets


def apply_rollup(session: Session, calls: Sequence[Any], *, removed: bool = False) -> None:
    """Fold ``calls`` (InferenceCall rows or call records) into the rollup, in the caller's
    transaction; with ``removed``, take them out of it (calls being deleted)."""
    buckets = _buckets(calls)
    if not buckets:
        return
    if removed:
        for sums in buckets.values():
            sums.negate()
    stmt = _upsert(session.get_bind().dialect.name)
    # Sorted: concurrent writers lock shared buckets in one order, so they cannot deadlock.
    session.execute(stmt, [_values(key, sums) for key, sums in sorted(buckets.items())])


@functools.cache
def _upsert(dialect: str) -> Any:
    # Built once per dialect: the statement is immutable, and building its two dozen
    # additions on every batch cost the writer thread more than executing it.
    table: Table = typing_cast(Table, UsageRollup.__table__)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    # One upsert a bucket, adding to what other writers (other processes too) have added:
    # no read-modify-write, so no lost update. Money adds exactly on both databases
    # (NUMERIC on PostgreSQL, integer picodollars on SQLite: see RollupMoney).
    return stmt.on_conflict_do_update(
        index_elements=["span", "bucket_start", "level", "model", "project_key"],
        set_={name: table.c[name] + stmt.excluded[name] for name in (*INT_FIELDS, *MONEY_FIELDS)},
    )


def _values(key: _Key, sums: Sums) -> dict[str, Any]:
    span, start, level, model, project_key = key
    return {"span": span, "bucket_start": start, "level": level, "model": model,
            "project_key": project_key, **sums.ints, **sums.money}  # fmt: skip


# --------------------------------------------------------------------------- reading


# --------------------------------------------------------------------------- checking

# The columns of a call the rollup sums, read in batches of this many rows.
_SUMMED = (
    InferenceCall.id, InferenceCall.timestamp, InferenceCall.level, InferenceCall.model,
    InferenceCall.project_id, InferenceCall.status, InferenceCall.latency_ms,
    *(getattr(InferenceCall, name) for name in (*TOKEN_FIELDS, *ROW_MONEY)),
)  # fmt: skip
_BATCH = 5000


def _each_batch(session: Session) -> Iterator[Sequence[Any]]:
    return in_id_order(session, select(*_SUMMED), InferenceCall.id, _BATCH)


def rebuild_rollup(session: Session) -> int:
    """Make the rollup again from every row of the call log, in the caller's transaction;
    the number of calls it now counts."""
    session.execute(delete(UsageRollup))
    counted = 0
    for rows in _each_batch(session):
        apply_rollup(session, rows)
        counted += len(rows)
    return counted


def refill_empty_rollup(session: Session) -> int:
    """Rebuild the rollup when it is empty and the log is not (a migration that carried rows
    in leaves it so); the calls counted (0: nothing done)."""
    if session.scalar(select(UsageRollup.id).limit(1)) is not None:
        return 0
    if session.scalar(select(InferenceCall.id).limit(1)) is None:
        return 0
    return rebuild_rollup(session)


def rollup_disagreements(session: Session, limit: int = 5) -> list[str]:
    """Where the rollup and the rows it sums differ: one line per differing bucket (at most
    ``limit``, then a count of the rest); empty when they agree exactly.

    Buckets are compared over all projects, as the rollup is read: a project's usage comes
    from its rows (operate/usage.py), and a host's delete moves a project's rows to no
    project (ON DELETE SET NULL) without moving its buckets, which is no disagreement."""
    expected: dict[_Key, Sums] = {}
    for rows in _each_batch(session):
        for (span, start, level, model, _), sums in _buckets(rows).items():
            key = (span, start, level, model, 0)
            if key in expected:
                expected[key].merge(sums)
            else:
                expected[key] = sums
    actual: dict[_Key, Sums] = {}
    table: Table = typing_cast(Table, UsageRollup.__table__)
    for row in session.execute(select(table)).mappings():
        key = (row["span"], row["bucket_start"], row["level"], row["model"], 0)
        sums = Sums()
        sums.ints = {name: row[name] for name in INT_FIELDS}
        sums.money = {name: Decimal(row[name]) for name in MONEY_FIELDS}
        if key in actual:
            actual[key].merge(sums)
        else:
            actual[key] = sums
    lines = []
    for key in sorted(expected.keys() | actual.keys()):
        want, have = expected.get(key, Sums()), actual.get(key, Sums())
        differ = [
            f"{name} {have_value} in the rollup, {want_value} in the rows"
            for name, want_value, have_value in (
                *((n, want.ints[n], have.ints[n]) for n in INT_FIELDS),
                *((n, want.money[n], have.money[n]) for n in MONEY_FIELDS),
            )
            if want_value != have_value
        ]
        if differ:
            span, start, level, model, _ = key
            lines.append(
                f"{span} {start.isoformat()} level={level} model={model}: {'; '.join(differ[:3])}"
            )
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more buckets"]
    return lines


def count_calls(session: Session) -> tuple[int, int]:
    """(rows in the call log, calls the rollup counts in its day buckets)."""
    rows = session.scalar(select(func.count()).select_from(InferenceCall)) or 0
    counted = session.scalar(
        select(func.coalesce(func.sum(UsageRollup.calls), 0)).where(UsageRollup.span == "day")
    )
    return int(rows), int(counted or 0)
