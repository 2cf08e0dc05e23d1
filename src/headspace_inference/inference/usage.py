"""Usage aggregates: the hourly rollup kept beside the call log, and the queries behind
/api/inference/usage.

Every call is counted in ``inference_usage_rollup`` twice: in its hour and in its day. Whole
days inside a window are read from day rows, the whole hours at its edges from hour rows,
and the partial hours at its very edges from an indexed range of raw rows, so a window of
any length reads a few hundred rollup rows. The rollup is written in
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
grouped by the model that answered (a fallback, when the primary failed).

Our estimate and OpenRouter's reported cost are compared like for like: over the calls
that have both (``compared_*``), so a model is listed in ``cost_disagreements`` when the
two differ by more than ``DISAGREEMENT``, or when OpenRouter charged for calls we could not
price.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import BigInteger, ColumnElement, Table, and_, case, cast, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..models import LINK_TABLES, InferenceCall, UsageRollup
from ..models.inference_call import LATENCY_BUCKETS_MS, PICO
from ..models.links import has_table, linked_row_exists

HIST = [f"lat_{i:02d}" for i in range(len(LATENCY_BUCKETS_MS) + 1)]
# A row's amounts; then the rollup's like-for-like sums over rows with both costs.
_ROW_MONEY = ("cost_usd", "saved_cost_usd", "upstream_cost_usd", "cache_discount_usd")
_MONEY_FIELDS = (*_ROW_MONEY, "compared_cost_usd", "compared_upstream_cost_usd")
# The token kinds a row carries, summed for calls that went upstream.
_TOKEN_FIELDS = (
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
    "reasoning_tokens",
)  # fmt: skip
_INT_FIELDS = ("calls", "cached_calls", "error_calls", *_TOKEN_FIELDS, "latency_ms_sum", *HIST)
# Our estimate and OpenRouter's figure disagree when they differ by more than this share.
DISAGREEMENT = Decimal("0.01")
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


def latency_bucket(latency_ms: int) -> int:
    """The histogram bucket of a latency."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def hour_floor(moment: datetime) -> datetime:
    """The start of the hour ``moment`` falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_floor(moment: datetime) -> datetime:
    """The start of the (UTC) day ``moment`` falls in."""
    return hour_floor(moment).replace(hour=0)


def _ceil(moment: datetime, floor: Any, step: timedelta) -> datetime:
    start: datetime = floor(moment)
    return start if start == moment else start + step


# --------------------------------------------------------------------------- writing


@dataclass
class _Sums:
    ints: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_INT_FIELDS, 0))
    money: dict[str, Decimal] = field(
        default_factory=lambda: dict.fromkeys(_MONEY_FIELDS, Decimal(0))
    )

    def merge(self, other: _Sums) -> None:
        """Add another bucket's sums to these."""
        for name, value in other.ints.items():
            self.ints[name] += value
        for name, amount in other.money.items():
            self.money[name] += amount

    def add(self, call: Any) -> None:
        ints = self.ints
        ints["calls"] += 1
        if call.status == "cached":
            ints["cached_calls"] += 1
        else:
            for name in _TOKEN_FIELDS:
                ints[name] += getattr(call, name) or 0
        if call.status not in ("ok", "cached"):
            ints["error_calls"] += 1
        latency = call.latency_ms or 0
        ints["latency_ms_sum"] += latency
        ints[HIST[latency_bucket(latency)]] += 1
        money = self.money
        for name in _ROW_MONEY:
            value = getattr(call, name)
            if value is not None:
                money[name] += Decimal(value)
        if call.cost_usd is not None and call.upstream_cost_usd is not None:
            money["compared_cost_usd"] += Decimal(call.cost_usd)
            money["compared_upstream_cost_usd"] += Decimal(call.upstream_cost_usd)


_Key = tuple[str, datetime, str, str, int]


def _buckets(calls: Sequence[Any]) -> dict[_Key, _Sums]:
    hours: dict[_Key, _Sums] = {}
    for call in calls:
        key = ("hour", hour_floor(call.timestamp), call.level, call.model, call.project_id or 0)
        sums = hours.get(key)
        if sums is None:
            sums = hours[key] = _Sums()
        sums.add(call)
    # Each call is counted in its day too: add up its hour buckets rather than the calls.
    buckets = dict(hours)
    for (_, hour, level, model, project), sums in hours.items():
        day_key = ("day", day_floor(hour), level, model, project)
        day = buckets.get(day_key)
        if day is None:
            day = buckets[day_key] = _Sums()
        day.merge(sums)
    return buckets


def apply_rollup(session: Session, calls: Sequence[Any]) -> None:
    """Fold ``calls`` (InferenceCall rows or call records) into the rollup, in the caller's
    transaction."""
    buckets = _buckets(calls)
    if not buckets:
        return
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
        set_={name: table.c[name] + stmt.excluded[name] for name in (*_INT_FIELDS, *_MONEY_FIELDS)},
    )


def _values(key: _Key, sums: _Sums) -> dict[str, Any]:
    span, start, level, model, project_key = key
    return {"span": span, "bucket_start": start, "level": level, "model": model,
            "project_key": project_key, **sums.ints, **sums.money}  # fmt: skip


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class UsageQuery:
    """A window [since, until) and optional filters."""

    since: datetime | None = None
    until: datetime | None = None
    level: str | None = None
    model: str | None = None
    project_id: int | None = None


@dataclass
class Usage:
    """Exact aggregates per (level, model)."""

    groups: dict[tuple[str, str], _Sums] = field(default_factory=dict)

    def merge(
        self, level: str, model: str, ints: dict[str, int], money: dict[str, Decimal]
    ) -> None:
        self.groups.setdefault((level, model), _Sums()).merge(_Sums(dict(ints), dict(money)))

    def comparable(self) -> dict[tuple[str, str], tuple[dict[str, int], dict[str, Decimal]]]:
        """The groups as plain values, dropping empty ones (for equality checks)."""
        return {
            k: (dict(v.ints), {n: m.normalize() for n, m in v.money.items()})
            for k, v in self.groups.items()
            if v.ints["calls"]
        }

    def to_dict(self, q: UsageQuery) -> dict[str, Any]:
        """The JSON answer of /api/inference/usage."""

        def money(value: Decimal) -> float:
            return float(round(value, 10))

        by_level: dict[str, _Sums] = {}
        by_model: dict[str, _Sums] = {}
        total = _Sums()
        for (level, model), sums in self.groups.items():
            targets = (by_level.setdefault(level, _Sums()), by_model.setdefault(model, _Sums()))
            for target in (*targets, total):
                target.merge(sums)
        return {
            "window": {
                "since": q.since.isoformat() if q.since else None,
                "until": q.until.isoformat() if q.until else None,
            },
            "filters": {"level": q.level, "model": q.model, "project_id": q.project_id},
            "total_calls": total.ints["calls"],
            "calls_by_level": {k: v.ints["calls"] for k, v in sorted(by_level.items())},
            "calls_by_model": {k: v.ints["calls"] for k, v in sorted(by_model.items())},
            "total_input_tokens": total.ints["input_tokens"],
            "total_output_tokens": total.ints["output_tokens"],
            "total_cached_input_tokens": total.ints["cached_input_tokens"],
            "total_cache_write_tokens": total.ints["cache_write_tokens"],
            "total_reasoning_tokens": total.ints["reasoning_tokens"],
            "tokens_by_level": {k: _tokens(v) for k, v in sorted(by_level.items())},
            "tokens_by_model": {k: _tokens(v) for k, v in sorted(by_model.items())},
            "total_cost": money(total.money["cost_usd"]),
            "cost_by_model": {k: money(v.money["cost_usd"]) for k, v in sorted(by_model.items())},
            "cost_by_level": {k: money(v.money["cost_usd"]) for k, v in sorted(by_level.items())},
            "upstream_reported_cost": money(total.money["upstream_cost_usd"]),
            "cache_discount": money(total.money["cache_discount_usd"]),
            "cache_discount_by_model": {
                k: money(v.money["cache_discount_usd"]) for k, v in sorted(by_model.items())
            },
            "cost_disagreements": {
                k: d for k, v in sorted(by_model.items()) if (d := _disagreement(v, money))
            },
            "cache_hits": total.ints["cached_calls"],
            "saved_cost": money(total.money["saved_cost_usd"]),
            "errors": total.ints["error_calls"],
            "latency_ms": {k: _latency(v) for k, v in sorted(by_level.items())},
        }


def _tokens(sums: _Sums) -> dict[str, int]:
    ints = sums.ints
    return {
        "input": ints["input_tokens"],
        "output": ints["output_tokens"],
        "cached_input": ints["cached_input_tokens"],
        "cache_write": ints["cache_write_tokens"],
        "reasoning": ints["reasoning_tokens"],
    }


def _disagreement(sums: _Sums, money: Callable[[Decimal], float]) -> dict[str, float] | None:
    """Where our estimate and OpenRouter's figure part for one model, or None."""
    m = sums.money
    ours, theirs = m["compared_cost_usd"], m["compared_upstream_cost_usd"]
    # What OpenRouter charged for calls that have no estimate (an unpriced model).
    unpriced = m["upstream_cost_usd"] - theirs
    if abs(theirs - ours) <= DISAGREEMENT * max(ours, theirs) and unpriced <= 0:
        return None
    return {
        "estimated": money(ours),
        "reported": money(theirs),
        "difference": money(theirs - ours),
        "reported_without_estimate": money(unpriced),
    }


def _latency(sums: _Sums) -> dict[str, Any]:
    counts = [sums.ints[name] for name in HIST]
    n = sum(counts)
    out: dict[str, Any] = {"mean": round(sums.ints["latency_ms_sum"] / n, 1) if n else None}
    for p in (50, 90, 99):
        out[f"p{p}"] = _percentile(counts, p)
    return out


def _percentile(counts: list[int], p: int) -> int | None:
    """The upper bound (ms) of the bucket holding the p-th percentile; None past the last."""
    n = sum(counts)
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return LATENCY_BUCKETS_MS[index] if index < len(LATENCY_BUCKETS_MS) else None
    return None


def _raw_money_sum(session: Session, column: Any) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.coalesce(func.sum(column), 0)
    # SQLite stores a call's amount as a float: round each to integer picodollars (exact,
    # as amounts carry at most twelve decimals) and sum integers.
    return func.coalesce(func.sum(cast(func.round(column * int(PICO)), BigInteger)), 0)


def _raw_money_value(session: Session, value: Any) -> Decimal:
    if session.get_bind().dialect.name == "postgresql":
        return Decimal(value or 0)
    return Decimal(int(value or 0)) / PICO


def _merge_rows(usage: Usage, rows: Any, money_value: Callable[[Any], Decimal]) -> None:
    width = len(_INT_FIELDS)
    for row in rows:
        values: list[Any] = list(row)
        ints = {
            name: int(v or 0) for name, v in zip(_INT_FIELDS, values[2 : 2 + width], strict=True)
        }
        amounts = {
            name: money_value(v) for name, v in zip(_MONEY_FIELDS, values[2 + width :], strict=True)
        }
        usage.merge(values[0], values[1], ints, amounts)


def _filters(
    q: UsageQuery, moment: Any, start: datetime | None, end: datetime | None, project: Any
) -> list[ColumnElement[bool]]:
    """The window [start, end) on ``moment`` and the query's filters, for either table
    (both name their level and model columns alike)."""
    table = moment.class_
    conditions: list[ColumnElement[bool]] = []
    if start is not None:
        conditions.append(moment >= start)
    if end is not None:
        conditions.append(moment < end)
    if q.level is not None:
        conditions.append(table.level == q.level)
    if q.model is not None:
        conditions.append(table.model == q.model)
    if q.project_id is not None:
        conditions.append(project == q.project_id)
    return conditions


def _from_rollup(
    session: Session,
    usage: Usage,
    q: UsageQuery,
    span: str,
    start: datetime | None,
    end: datetime | None,
) -> None:
    r = UsageRollup
    conditions = [r.span == span, *_filters(q, r.bucket_start, start, end, r.project_key)]
    if q.project_id is not None and has_table(session.connection(), LINK_TABLES["project_id"]):
        # A deleted project's calls keep their rows with project_id NULL (ON DELETE SET NULL),
        # but its rollup rows keep its key: they count for the project only while it exists,
        # so the rollup answers exactly what the raw rows do.
        conditions.append(linked_row_exists("project_id", r.project_key))
    columns = [func.coalesce(func.sum(getattr(r, name)), 0) for name in _INT_FIELDS]
    # Typed by RollupMoney, so both databases answer Decimal dollars.
    money = [func.coalesce(func.sum(getattr(r, name)), 0) for name in _MONEY_FIELDS]
    stmt = select(r.level, r.model, *columns, *money).where(and_(True, *conditions))
    rows = session.execute(stmt.group_by(r.level, r.model))
    _merge_rows(usage, rows, lambda v: Decimal(v or 0))


def _from_raw(
    session: Session, usage: Usage, q: UsageQuery, start: datetime | None, end: datetime | None
) -> None:
    c = InferenceCall
    conditions = _filters(q, c.timestamp, start, end, c.project_id)
    not_cached = c.status != "cached"
    ints: list[Any] = [
        func.count(),
        func.sum(case((c.status == "cached", 1), else_=0)),
        func.sum(case((c.status.not_in(["ok", "cached"]), 1), else_=0)),
        *(func.sum(case((not_cached, getattr(c, name)), else_=0)) for name in _TOKEN_FIELDS),
        func.sum(c.latency_ms),
    ]
    lower = None
    for bound in (*LATENCY_BUCKETS_MS, None):
        cond = []
        if lower is not None:
            cond.append(c.latency_ms > lower)
        if bound is not None:
            cond.append(c.latency_ms <= bound)
        ints.append(func.sum(case((and_(True, *cond), 1), else_=0)))
        lower = bound
    both = and_(c.cost_usd.is_not(None), c.upstream_cost_usd.is_not(None))
    amounts = [getattr(c, name) for name in _ROW_MONEY]
    amounts += [case((both, c.cost_usd)), case((both, c.upstream_cost_usd))]
    money = [_raw_money_sum(session, amount) for amount in amounts]
    stmt = select(c.level, c.model, *ints, *money).where(and_(True, *conditions))
    rows = session.execute(stmt.group_by(c.level, c.model))
    _merge_rows(usage, rows, lambda v: _raw_money_value(session, v))


def compute_usage(session: Session, q: UsageQuery) -> Usage:
    """Aggregates for the window: whole days and hours from the rollup, the rest raw."""
    usage = Usage()
    since, until = q.since, q.until
    # [h0, h1): the whole hours inside the window (None: unbounded on that side).
    h0 = None if since is None else _ceil(since, hour_floor, _HOUR)
    h1 = None if until is None else hour_floor(until)
    if h0 is not None and h1 is not None and h0 >= h1:
        _from_raw(session, usage, q, since, until)  # the window lies within an hour or two
        return usage
    # [d0, d1): the whole days inside those hours.
    d0 = None if h0 is None else _ceil(h0, day_floor, _DAY)
    d1 = None if h1 is None else day_floor(h1)
    if d0 is not None and d1 is not None and d0 >= d1:
        _from_rollup(session, usage, q, "hour", h0, h1)
    else:
        _from_rollup(session, usage, q, "day", d0, d1)
        if h0 is not None and d0 is not None and h0 < d0:
            _from_rollup(session, usage, q, "hour", h0, d0)
        if h1 is not None and d1 is not None and d1 < h1:
            _from_rollup(session, usage, q, "hour", d1, h1)
    if since is not None and h0 is not None and since < h0:
        _from_raw(session, usage, q, since, h0)
    if until is not None and h1 is not None and h1 < until:
        _from_raw(session, usage, q, h1, until)
    return usage


def compute_usage_raw(session: Session, q: UsageQuery) -> Usage:
    """The same aggregates from raw rows only (for checks and benchmarks)."""
    usage = Usage()
    _from_raw(session, usage, q, q.since, q.until)
    return usage


def usage_report(session: Session, q: UsageQuery) -> dict[str, Any]:
    """The /api/inference/usage answer for ``q``."""
    return compute_usage(session, q).to_dict(q)


def usage_report_raw(session: Session, q: UsageQuery) -> dict[str, Any]:
    """The same answer computed from raw rows only."""
    return compute_usage_raw(session, q).to_dict(q)


__all__ = [
    "Usage",
    "UsageQuery",
    "apply_rollup",
    "compute_usage",
    "compute_usage_raw",
    "usage_report",
    "usage_report_raw",
]
