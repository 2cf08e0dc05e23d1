"""One call's row in the call log, as an immutable value that can travel through a journal
file and into ``inference_calls`` (inference/request.py builds it from a call's outcome)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import String, Table

from .models import InferenceCall

# How much of a long answer or error message the log keeps (policy, not a column width).
MAX_RESULT_CHARS = 1_000_000
MAX_ERROR_CHARS = 2000

_MONEY = ("cost_usd", "upstream_cost_usd", "saved_cost_usd", "cache_discount_usd")
_COLUMNS = cast(Table, InferenceCall.__table__).columns
# The width of every bounded text column, read from the table's own definition.
_WIDTHS: dict[str, int] = {
    column.name: column.type.length
    for column in _COLUMNS
    if isinstance(column.type, String) and column.type.length is not None
}


def clip(name: str, value: str | None, size: int | None = None) -> str | None:
    """``value`` without NULs, cut to ``size`` characters, else to column ``name``'s width."""
    if value is None:
        return None
    return value.replace("\x00", "")[: size or _WIDTHS[name]]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One inference_calls row."""

    request_id: str
    timestamp: datetime
    level: str
    purpose: str
    model: str
    status: str
    input_hash: str
    input_tokens: int = 0
    output_tokens: int = 0
    result_text: str | None = None
    input_text: str | None = None
    latency_ms: int = 0
    cost_usd: Decimal | None = None
    upstream_cost_usd: Decimal | None = None
    saved_cost_usd: Decimal | None = None
    requested_model: str | None = None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_discount_usd: Decimal | None = None
    error_type: str | None = None
    error_message: str | None = None
    cached: bool = False
    attempts: int = 0
    generation_id: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    project_id: int | None = None
    agent_id: int | None = None
    command_id: int | None = None
    turn_id: int | None = None

    def __post_init__(self) -> None:
        # Every text is cut to its column, whatever built the record (a call's outcome, a
        # journal line an older version wrote): the database never refuses a row for length.
        for name, width in _WIDTHS.items():
            value = getattr(self, name)
            if value is not None and (len(value) > width or "\x00" in value):
                object.__setattr__(self, name, clip(name, value))

    def to_json(self) -> str:
        """One journal line (no newline)."""
        data = {name: getattr(self, name) for name in FIELD_NAMES}
        data["timestamp"] = self.timestamp.isoformat()
        for name in _MONEY:
            if data[name] is not None:
                data[name] = str(data[name])
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> CallRecord:
        """The record a journal line holds."""
        data = json.loads(line)
        data["timestamp"] = datetime.fromisoformat(data["timestamp"])
        for name in _MONEY:
            if data.get(name) is not None:
                data[name] = Decimal(data[name])
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})

    def values(self) -> dict[str, Any]:
        """Column name -> value."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    def copy_row(self) -> tuple[Any, ...]:
        """The values in FIELD_NAMES order, timestamps as naive UTC (as the column stores)."""
        values = [getattr(self, name) for name in FIELD_NAMES]
        values[_TIMESTAMP] = self.timestamp.astimezone(UTC).replace(tzinfo=None)
        return tuple(values)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(CallRecord))
_FIELDS = frozenset(FIELD_NAMES)
_TIMESTAMP = FIELD_NAMES.index("timestamp")
