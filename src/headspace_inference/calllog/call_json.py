"""A row of the call log as JSON: the CALL that the calls API lists, the live feed sends
and ``service.on_call_recorded`` hands a host (and, with its answer, the CallDetail of
``/calls/<id>``). The pydantic models name the fields, in order, and the OpenAPI document is
generated from them (operate/schemas.py); rows are serialised by the same field lists as
plain dicts, not model instances, since the list and the feed serialise rows on their hot
path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from .models import InferenceCall

CallStatus = Literal["ok", "cached", "error", "rate_limited", "over_budget", "refused", "cancelled"]


class Answer(BaseModel):
    """An answer whose keys are all listed."""

    model_config = ConfigDict(extra="forbid")


class Call(Answer):
    """A CALL: one row of the call log, in the order its JSON shows it (the list and the
    event feed). ``call_id`` is the row's ``request_id``; money is in US dollars."""

    id: int
    call_id: str
    timestamp: datetime
    level: str
    purpose: str
    model: str
    status: CallStatus
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    saved_cost_usd: float | None
    latency_ms: int
    cached: bool
    attempts: int
    error_type: str | None
    error_message: str | None
    provider: str | None
    finish_reason: str | None
    project_id: int | None
    agent_id: int | None
    command_id: int | None
    turn_id: int | None


class CallDetail(Call):
    """A CALL with its answer and the rest of its row. The input is kept as its hash, and
    as ``input_text`` only when the host sets inference.store_input_text (else null)."""

    result_text: str | None
    input_text: str | None
    input_hash: str
    generation_id: str | None
    upstream_cost_usd: float | None


# A CALL's JSON keys are its model's fields; each is the row's column of the same name but
# call_id, the row's request_id.
_COLUMN_OF = {"call_id": "request_id"}
# (JSON key, column, serialiser) for each field of a model, in its order.
Shape = tuple[tuple[str, str, Callable[[Any], Any]], ...]


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _money(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _same(value: Any) -> Any:
    return value


def _serialiser(field: FieldInfo) -> Callable[[Any], Any]:
    """How a column's value becomes the JSON the field's type documents: datetimes as ISO
    8601 in UTC, money (a Decimal column, a float field) as a float."""
    if field.annotation is datetime:
        return _timestamp
    if field.annotation in (float, float | None):
        return _money
    return _same


def _shape(model: type[Call]) -> Shape:
    """The shape of ``model``'s JSON."""
    return tuple(
        (name, _COLUMN_OF.get(name, name), _serialiser(field))
        for name, field in model.model_fields.items()
    )


# Plain dicts built from the model's fields, not model instances: the list and the live feed
# serialise rows on their hot path, and the answers' agreement with the document is what
# the tests check.
_CALL = _shape(Call)
DETAIL = _shape(CallDetail)
_COLUMNS = [getattr(InferenceCall, column) for _, column, _ in _CALL]
DETAIL_COLUMNS = [getattr(InferenceCall, column) for _, column, _ in DETAIL]


def call_json(row: Any, shape: Shape = _CALL) -> dict[str, Any]:
    """A CALL (or, with ``DETAIL``, a CallDetail) from a row holding its columns."""
    return {name: serialise(getattr(row, column)) for name, column, serialise in shape}


def select_calls() -> Select[Any]:
    """The columns of a CALL, for any query over inference_calls."""
    return select(*_COLUMNS)


def calls_with_request_ids(session: Session, request_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The CALLs of the rows with these request ids, in row order: what a committed batch
    looks like to those told of it (row ids are the database's; COPY returns none)."""
    rows = session.execute(
        select_calls().where(InferenceCall.request_id.in_(request_ids)).order_by(InferenceCall.id)
    ).all()
    return [call_json(row) for row in rows]
