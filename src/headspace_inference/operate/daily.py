"""GET /api/inference/usage/daily: cost per day by model, from the rollup's day rows (the
operator page's chart)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from flask import Response, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..calllog.models import UsageRollup
from .http import BadParameter, bp, read_answer

DEFAULT_DAYS = 14
MAX_DAYS = 366


def parse_days(args: Any) -> int:
    """The window's length in days; BadParameter names a bad parameter."""
    unknown = sorted(set(args) - {"days"})
    if unknown:
        raise BadParameter(f"{unknown[0]}: unknown parameter (known: days)")
    if len(args.getlist("days")) > 1:
        raise BadParameter("days: given more than once")
    raw = args.get("days", str(DEFAULT_DAYS))
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        raise BadParameter(f"days: must be an integer from 1 to {MAX_DAYS}, got {raw!r:.40}")
    return int(raw)


def daily_cost(session: Session, days: int, today: datetime) -> dict[str, Any]:
    """Cost per UTC day and model over the ``days`` days ending with ``today``'s, read from
    the rollup's day rows (a few per day, whatever the number of calls)."""
    first = today.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first -= timedelta(days=days - 1)
    rows = session.execute(
        select(UsageRollup.bucket_start, UsageRollup.model, UsageRollup.cost_usd, UsageRollup.calls)
        .where(UsageRollup.span == "day")
        .where(UsageRollup.bucket_start >= first)
    ).all()
    cost: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    calls: dict[str, int] = defaultdict(int)
    for row in rows:
        day = row.bucket_start.date().isoformat()
        cost[day][row.model] += row.cost_usd
        calls[day] += row.calls
    day_names = [(first + timedelta(days=i)).date().isoformat() for i in range(days)]
    models = sorted({model for per_day in cost.values() for model in per_day})
    return {
        "days": [
            {
                "day": day,
                "calls": calls.get(day, 0),
                "cost_by_model": {m: float(round(c, 10)) for m, c in sorted(cost[day].items())}
                if day in cost
                else {},
            }
            for day in day_names
        ],
        "models": models,
    }


@bp.get("/usage/daily")
def usage_daily() -> Response:
    """Cost per day by model over the last ``days`` days (UTC), for the page's chart."""
    return read_answer(
        lambda: parse_days(request.args),
        lambda session, days: daily_cost(session, days, datetime.now(UTC)),
        "usage cannot be read now",
    )
