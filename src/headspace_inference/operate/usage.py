"""The usage queries behind /api/inference/usage and ``flask inference usage``.

They read the rollup calllog/rollup.py writes (whole days from day rows, whole hours from
hour rows, the partial hours at a window's edges from raw rows), so a window of any length
reads a few hundred rows, and they give the same answer as summing the raw rows. A project's
usage is read from its rows alone (see compute_usage).

Our estimate and OpenRouter's reported cost are compared like for like: over the calls
that have both (``compared_*``), so a model is listed in ``cost_disagreements`` when the
two differ by more than ``DISAGREEMENT``, or when OpenRouter charged for calls we could not
price.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, and_, case, cast, func, select
from sqlalchemy.orm import Session

from ..calllog.models import InferenceCall, UsageRollup
from ..calllog.models.inference_call import LATENCY_BUCKETS_MS
from ..calllog.models.links import while_linked_row_exists
from ..calllog.rollup import (
    DAY,
    HIST,
    HOUR,
    INT_FIELDS,
    MONEY_FIELDS,
    ROW_MONEY,
    TOKEN_FIELDS,
    Sums,
    ceil_to,
    day_floor,
    hour_floor,
)
from ..row_bounds import PICO

DISAGREEMENT = Decimal("0.01")


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

    groups: dict[tuple[str, str], Sums] = field(default_factory=dict)

    def merge(
        self, level: str, model: str, ints: dict[str, int], money: dict[str, Decimal]
    ) -> None:
        self.groups.setdefault((level, model), Sums()).merge(Sums(dict(ints), dict(money)))

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

        by_level: dict[str, Sums] = {}
        by_model: dict[str, Sums] = {}
        total = Sums()
        for (level, model), sums in self.groups.items():
            targets = (by_level.setdefault(level, Sums()), by_model.setdefault(model, Sums()))
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


def _tokens(sums: Sums) -> dict[str, int]:
    ints = sums.ints
    return {
        "input": ints["input_tokens"],
        "output": ints["output_tokens"],
        "cached_input": ints["cached_input_tokens"],
        "cache_write": ints["cache_write_tokens"],
        "reasoning": ints["reasoning_tokens"],
    }


def _disagreement(sums: Sums, money: Callable[[Decimal], float]) -> dict[str, float] | None:
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


def _latency(sums: Sums) -> dict[str, Any]:
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
    width = len(INT_FIELDS)
    for row in rows:
        values: list[Any] = list(row)
        ints = {
            name: int(v or 0) for name, v in zip(INT_FIELDS, values[2 : 2 + width], strict=True)
        }
        amounts = {
            name: money_value(v) for name, v in zip(MONEY_FIELDS, values[2 + width :], strict=True)
        }
        usage.merge(values[0], values[1], ints, amounts)


def _filters(
    q: UsageQuery, moment: Any, start: datetime | None, end: datetime | None
) -> list[ColumnElement[bool]]:
    """The window [start, end) on ``moment`` and the level and model filters, for either
    table (both name those columns alike). A project's usage is read from the rows alone
    (compute_usage), so its filter is _from_raw's."""
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
    conditions = [r.span == span, *_filters(q, r.bucket_start, start, end)]
    columns = [func.coalesce(func.sum(getattr(r, name)), 0) for name in INT_FIELDS]
    # Typed by RollupMoney, so both databases answer Decimal dollars.
    money = [func.coalesce(func.sum(getattr(r, name)), 0) for name in MONEY_FIELDS]
    stmt = select(r.level, r.model, *columns, *money).where(and_(True, *conditions))
    rows = session.execute(stmt.group_by(r.level, r.model))
    _merge_rows(usage, rows, lambda v: Decimal(v or 0))


def _from_raw(
    session: Session, usage: Usage, q: UsageQuery, start: datetime | None, end: datetime | None
) -> None:
    c = InferenceCall
    conditions = _filters(q, c.timestamp, start, end)
    if q.project_id is not None:
        conditions.append(c.project_id == q.project_id)
        conditions += while_linked_row_exists(session, "project_id", c.project_id)
    not_cached = c.status != "cached"
    ints: list[Any] = [
        func.count(),
        func.sum(case((c.status == "cached", 1), else_=0)),
        func.sum(case((c.status.not_in(["ok", "cached"]), 1), else_=0)),
        *(func.sum(case((not_cached, getattr(c, name)), else_=0)) for name in TOKEN_FIELDS),
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
    amounts = [getattr(c, name) for name in ROW_MONEY]
    amounts += [case((both, c.cost_usd)), case((both, c.upstream_cost_usd))]
    money = [_raw_money_sum(session, amount) for amount in amounts]
    stmt = select(c.level, c.model, *ints, *money).where(and_(True, *conditions))
    rows = session.execute(stmt.group_by(c.level, c.model))
    _merge_rows(usage, rows, lambda v: _raw_money_value(session, v))


def compute_usage(session: Session, q: UsageQuery) -> Usage:
    """Aggregates for the window: whole days and hours from the rollup, the rest raw; a
    project's from its rows alone."""
    usage = Usage()
    since, until = q.since, q.until
    if q.project_id is not None:
        # The rollup keys a project by the host's id, which does not name one project for
        # good: deleting a project unlinks its rows (ON DELETE SET NULL) but not its rollup
        # buckets, and SQLite gives the highest deleted id to the next project. Only the
        # rows say which calls are a project's now; the (project_id, timestamp) index reads
        # just that project's.
        _from_raw(session, usage, q, since, until)
        return usage
    # [h0, h1): the whole hours inside the window (None: unbounded on that side).
    h0 = None if since is None else ceil_to(since, hour_floor, HOUR)
    h1 = None if until is None else hour_floor(until)
    if h0 is not None and h1 is not None and h0 >= h1:
        _from_raw(session, usage, q, since, until)  # the window lies within an hour or two
        return usage
    # [d0, d1): the whole days inside those hours.
    d0 = None if h0 is None else ceil_to(h0, day_floor, DAY)
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
    "compute_usage",
    "compute_usage_raw",
    "usage_report",
    "usage_report_raw",
]
