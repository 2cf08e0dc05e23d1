"""The call log: one row per inference outcome, and its hourly rollup for usage queries."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from ...row_bounds import (
    MODEL_NAME_CHARS,
    PICO,
    PURPOSE_CHARS,
    USD_DECIMALS,
    USD_DIGITS,
)
from .base import NAME_PREFIX, Base, UTCDateTime

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Money = Numeric(USD_DIGITS, USD_DECIMALS, asdecimal=True)


class _RawNumeric(Numeric[Decimal]):
    """NUMERIC(20, 12) (Money's) in DDL, with the driver's values passed through untouched."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class RollupMoney(TypeDecorator[Decimal]):
    """USD sums: NUMERIC on PostgreSQL; integer picodollars on SQLite, whose NUMERIC holds
    a float, so that sums (also ``col = col + excluded.col`` in an upsert) stay exact."""

    impl = Money
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            # Same DDL (NUMERIC affinity keeps integers as integers), no float conversion.
            return dialect.type_descriptor(_RawNumeric(USD_DIGITS, USD_DECIMALS))
        return dialect.type_descriptor(Money)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        # Exact: amounts carry at most twelve decimals.
        return int((Decimal(value) * PICO).to_integral_value())

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)) / PICO
        return Decimal(value)


# The tables a call's links refer to, by the call's field name: the host's tables (or the
# standalone app's). They are not the service's: the link columns carry no ForeignKey here,
# and the database constraint (ON DELETE SET NULL) is added by link_keys.py wherever the
# table exists. Ids are integers.
LINK_TABLES: dict[str, str] = {
    "project_id": "projects",
    "agent_id": "agents",
    "command_id": "commands",
    "turn_id": "turns",
}


class InferenceCall(Base):
    """One inference call's outcome: success, cache hit, failure, refusal or cancellation."""

    __tablename__ = "inference_calls"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(32), unique=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    level: Mapped[str] = mapped_column(String(16), index=True)
    purpose: Mapped[str] = mapped_column(String(PURPOSE_CHARS))
    # The model that answered (a fallback, when the primary failed); requested_model is
    # the primary asked for (what ``model`` is too when nothing answered).
    model: Mapped[str] = mapped_column(String(MODEL_NAME_CHARS))
    requested_model: Mapped[str | None] = mapped_column(String(MODEL_NAME_CHARS))
    status: Mapped[str] = mapped_column(String(16))
    # input_tokens is OpenRouter's prompt_tokens, cached and cache-write tokens included;
    # reasoning tokens are part of output_tokens.
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    input_hash: Mapped[str] = mapped_column(String(64), index=True)
    result_text: Mapped[str | None] = mapped_column(Text)
    # The prompt, kept only when the host asks (inference.store_input_text), bounded and
    # redacted like the answer; adopted host rows bring theirs.
    input_text: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    upstream_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    # On a cache hit: what the answer cost when it was fetched, i.e. what the hit saved.
    saved_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    # What the provider's prompt cache took off cost_usd (negative: writing cost more).
    cache_discount_usd: Mapped[Decimal | None] = mapped_column(Money)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    generation_id: Mapped[str | None] = mapped_column(String(100))
    provider: Mapped[str | None] = mapped_column(String(100))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    project_id: Mapped[int | None] = mapped_column(Integer, index=True)
    agent_id: Mapped[int | None] = mapped_column(Integer, index=True)
    command_id: Mapped[int | None] = mapped_column(Integer, index=True)
    turn_id: Mapped[int | None] = mapped_column(Integer, index=True)

    __table_args__ = (
        Index(NAME_PREFIX + "ix_inference_calls_level_timestamp", "level", "timestamp"),
        Index(NAME_PREFIX + "ix_inference_calls_project_id_timestamp", "project_id", "timestamp"),
    )


# Upper bounds (ms, inclusive) of the latency histogram buckets; one more bucket holds the rest.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
)  # fmt: skip


class UsageRollup(Base):
    """Sums of inference_calls per hour and per day, level, model and project, kept in the
    same transaction as the rows they sum, so usage over any window reads a few rows."""

    __tablename__ = "inference_usage_rollup"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # "hour" or "day": every call is counted once in each span.
    span: Mapped[str] = mapped_column(String(8))
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime())
    level: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(MODEL_NAME_CHARS))
    # 0 stands for "no project": a unique key cannot rely on NULL equality.
    project_key: Mapped[int] = mapped_column(Integer, default=0)
    calls: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    error_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    saved_cost_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    upstream_cost_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    cache_discount_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    # Cost sums over the calls that have both our estimate and OpenRouter's figure, so the
    # two can be compared like for like (/usage's cost_disagreements).
    compared_cost_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    compared_upstream_cost_usd: Mapped[Decimal] = mapped_column(RollupMoney, default=Decimal(0))
    latency_ms_sum: Mapped[int] = mapped_column(BigInteger, default=0)
    # Latency histogram: lat_00 counts calls with latency_ms <= LATENCY_BUCKETS_MS[0], ...
    # the last bucket everything slower. Percentiles are read from these counts, both here
    # and in the raw computation, so the two agree exactly.
    lat_00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_13: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        UniqueConstraint(
            "span",
            "bucket_start",
            "level",
            "model",
            "project_key",
            name=NAME_PREFIX + "uq_inference_usage_rollup_bucket",
        ),
    )


# Where the service keeps a host's own ``inference_calls`` it took over (calllog/adopt.py):
# the host's table as it was, under a name of the service's, given back on downgrade.
HOST_ARCHIVE_TABLE = NAME_PREFIX + "host_inference_calls"
# The constraints the archive is kept without (they reach the host's tables or could refuse
# its actions on them), with their definitions, to be put back on downgrade.
HOST_ARCHIVE_CONSTRAINTS = NAME_PREFIX + "host_inference_calls_constraints"
