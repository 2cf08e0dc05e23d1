"""One call's row in the call log, as an immutable value built from the request and its
outcome, that can travel through a journal file and into ``inference_calls``."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import String, Table

from ..models import InferenceCall
from .errors import StructuredAnswerError
from .types import Answer, InferenceRequest

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


def _clip(name: str, value: str | None, size: int | None = None) -> str | None:
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

    @classmethod
    def of(
        cls,
        request: InferenceRequest,
        *,
        status: str,
        latency_ms: int,
        answer: Answer | None = None,
        error: BaseException | None = None,
        attempts: int = 0,
    ) -> CallRecord:
        """The row of one call: ``answer`` for ``ok`` and ``cached``, ``error`` otherwise.

        A cached row costs nothing; what its answer cost when it was fetched is what it saved.
        ``model`` is the model that answered; an answer that failed its response_format was
        answered (and paid for) too, so its row keeps it, raw text, tokens and cost, beside
        the error.
        """
        links = request.links
        outcome: dict[str, Any] = {}
        if answer is None and isinstance(error, StructuredAnswerError):
            answer = error.answer
        if answer is not None:
            cached = status == "cached"
            outcome = {
                "model": _clip("model", answer.model),
                "input_tokens": answer.input_tokens,
                "output_tokens": answer.output_tokens,
                "cached_input_tokens": answer.cached_input_tokens,
                "cache_write_tokens": answer.cache_write_tokens,
                "reasoning_tokens": answer.reasoning_tokens,
                "result_text": _clip("result_text", answer.text, MAX_RESULT_CHARS),
                "cost_usd": Decimal(0) if cached else answer.cost_usd,
                "upstream_cost_usd": None if cached else answer.upstream_cost_usd,
                "saved_cost_usd": answer.cost_usd if cached else None,
                "cache_discount_usd": None if cached else answer.cache_discount_usd,
                "cached": cached,
                "generation_id": _clip("generation_id", answer.generation_id),
                "provider": _clip("provider", answer.provider),
                "finish_reason": _clip("finish_reason", answer.finish_reason),
            }
        if error is not None:
            outcome |= {
                "error_type": _clip("error_type", type(error).__name__),
                "error_message": _clip("error_message", str(error), MAX_ERROR_CHARS),
            }
        outcome.setdefault("model", request.model)
        return cls(
            request_id=request.request_id,
            timestamp=datetime.now(UTC),
            level=request.level,
            purpose=request.purpose,
            requested_model=request.model,
            status=status,
            input_hash=request.key,
            latency_ms=latency_ms,
            attempts=attempts,
            project_id=links.project_id,
            agent_id=links.agent_id,
            command_id=links.command_id,
            turn_id=links.turn_id,
            **outcome,
        )

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
